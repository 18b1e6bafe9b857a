import DiffuseCore
import DiffuseGraph
import DiffuseModels

/// A LoRA file and the strength to apply it with (`--lora PATH[:SCALE]`; diffusers'
/// `fuse_lora(lora_scale=)`).
public struct LoRA {
    public let file: LoRAFile
    public var scale: Float

    public init(file: LoRAFile, scale: Float = 1) {
        self.file = file
        self.scale = scale
    }

    /// `PATH` or `PATH:SCALE` (a path may itself hold colons: only a number after the last one
    /// is a scale).
    public static func open(_ argument: String) throws -> LoRA {
        if let colon = argument.lastIndex(of: ":"), colon != argument.startIndex,
           let scale = Float(argument[argument.index(after: colon)...]) {
            guard scale.isFinite else { throw PipelineError("--lora \(argument): the scale must be a finite number") }
            return LoRA(file: try LoRAFile(path: String(argument[..<colon])), scale: scale)
        }
        return LoRA(file: try LoRAFile(path: argument))
    }
}

/// A low-rank adapter file, read as diffusers' `load_lora_weights` reads it for the Stable
/// Diffusion pipelines, in either format people have:
/// - sd-scripts / AUTOMATIC1111 ("kohya"): `lora_unet_*`, `lora_te_*` (`lora_te1_*`, `lora_te2_*`
///   for SDXL) with `.lora_down.weight`, `.lora_up.weight` and `.alpha`; module names are dotted
///   paths with the dots flattened to underscores, SDXL UNets' in the original SGM blocks
///   (`input_blocks_4_1_…`). Convolutions (LoCon: a k×k down, a 1×1 up) included.
/// - diffusers / peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`,
///   `text_encoder_2.`), with the adapter config (`lora_alpha`, `alpha_pattern`, `rank_pattern`,
///   `use_rslora`) in the file's `lora_adapter_metadata`; and the older diffusers spellings
///   (`.lora.down.weight`, `.lora_linear_layer.down.weight`, attention processors' `to_q_lora`).
/// Each module adds `scale · (alpha / rank) · up · down` to its weight when the model is loaded
/// (diffusers' `fuse_lora`), so generation runs at full speed with no extra layers.
public final class LoRAFile {
    public enum Format: String, Sendable { case kohya, peft, diffusers }

    /// One adapted module as the file names it.
    public struct Module {
        /// A dotted module path (`down_blocks.0.attentions.0.…to_q`), or sd-scripts' flattened one.
        public let name: String
        public let flattened: Bool
        let down: String
        let up: String
        let upBias: String?
        public let rank: Int
        /// alpha / rank (alpha / √rank with rsLoRA): what multiplies up · down.
        public let scale: Float
    }

    /// The components an adapter may hold, in the pipelines' order.
    public static let components = ["unet", "text_encoder", "text_encoder_2"]

    public let path: String
    public let format: Format
    /// The adapted modules per component: `unet`, `text_encoder`, `text_encoder_2`.
    public let modules: [String: [Module]]
    let tensors: SafeTensorsFile

    /// The file's name without folders, for messages and the PNG's parameters.
    public var name: String { Files.lastComponent(path) }

    public init(path: String) throws {
        self.path = path
        let file: SafeTensorsFile
        do { file = try SafeTensorsFile(path: path) } catch {
            throw PipelineError("LoRA \(error)")
        }
        tensors = file
        let names = file.names
        guard !names.isEmpty else { throw PipelineError("\(path): no tensors: not a LoRA file") }
        if let lycoris = names.first(where: { n in [".hada_w", ".lokr_w", ".lora_mid.", ".oft_"].contains { n.contains($0) } }) {
            throw PipelineError("\(path): tensor '\(lycoris)' belongs to a LyCORIS adapter (LoHa, LoKr, Tucker or OFT); only LoRA files (lora_down/lora_up or lora_A/lora_B) are supported")
        }
        if names.allSatisfy({ n in Self.kohyaPrefixes.contains { n.hasPrefix($0.0) } }) {
            format = .kohya
            modules = try Self.readKohya(file)
        } else {
            (format, modules) = try Self.readDiffusers(file)
        }
    }

    /// A line per component: how many modules, their ranks and alpha / rank.
    public var summary: [String] {
        Self.components.compactMap { component in
            guard let list = modules[component], !list.isEmpty else { return nil }
            func span<T: Comparable>(_ values: [T]) -> String {
                let (lo, hi) = (values.min()!, values.max()!)
                return lo == hi ? "\(lo)" : "\(lo)–\(hi)"
            }
            return "\(component): \(list.count) modules, rank \(span(list.map(\.rank))), alpha/rank \(span(list.map(\.scale)))"
        }
    }

    // MARK: sd-scripts

    /// sd-scripts' name prefixes and the components they adapt (SDXL's first text encoder is
    /// `lora_te1_`, SD 1.x/2.x's only one `lora_te_`).
    static let kohyaPrefixes = [("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"),
                                ("lora_te_", "text_encoder")]

    private static func readKohya(_ file: SafeTensorsFile) throws -> [String: [Module]] {
        struct Entry { var component: String, name: String, down: String? = nil, up: String? = nil, alpha: Float? = nil }
        var order: [String] = []
        var entries: [String: Entry] = [:]
        var doraIgnored = false
        for tensor in file.names {
            let dot = tensor.firstIndex(of: ".") ?? tensor.endIndex
            let key = String(tensor[..<dot]), suffix = String(tensor[dot...])
            if entries[key] == nil {
                let (prefix, component) = kohyaPrefixes.first { key.hasPrefix($0.0) }!
                order.append(key)
                entries[key] = Entry(component: component, name: String(key.dropFirst(prefix.count)))
            }
            switch suffix {
            case ".lora_down.weight": entries[key]!.down = tensor
            case ".lora_up.weight": entries[key]!.up = tensor
            case ".alpha": entries[key]!.alpha = try scalar(file, tensor)
            case ".dora_scale": doraIgnored = true
            default: throw PipelineError("\(file.path): tensor '\(tensor)' is not part of a LoRA (expected .lora_down.weight, .lora_up.weight or .alpha)")
            }
        }
        if doraIgnored {
            // diffusers drops a kohya file's DoRA magnitudes with a warning and applies the rest.
            Log.warning("\(file.path): DoRA magnitudes (dora_scale) are ignored, as diffusers ignores them in this format")
        }
        var byComponent: [String: [(entry: Entry, rank: Int)]] = [:]
        for key in order {
            let e = entries[key]!
            guard let down = e.down, let up = e.up else {
                throw PipelineError("\(file.path): LoRA module '\(key)' has no \(e.down == nil ? "lora_down" : "lora_up") weight")
            }
            byComponent[e.component, default: []].append((e, try rank(file, down: down, up: up)))
        }
        // Each module's own alpha, as sd-scripts, AUTOMATIC1111 and ComfyUI apply it. (diffusers
        // 0.42 gives attention projections the most common alpha when a file's alphas differ:
        // its alpha_pattern keys keep the processor spelling, which no module name matches.)
        return byComponent.mapValues { list in
            let fallback = mostCommon(list.compactMap(\.entry.alpha))
            return list.map { m in
                Module(name: m.entry.name, flattened: true, down: m.entry.down!, up: m.entry.up!, upBias: nil, rank: m.rank,
                       scale: (m.entry.alpha ?? fallback ?? Float(m.rank)) / Float(m.rank))
            }
        }
    }

    // MARK: diffusers and peft

    enum Role { case down, up, upBias, alpha }

    /// The tensor-name endings of diffusers' formats, longest first: peft's, LoRACompatibleLinear's,
    /// the text encoders' `lora_linear_layer`, and the attention processors' `to_q_lora.down`.
    static let diffusersRoles: [(suffix: String, role: Role)] = [
        (".lora_A.weight", .down), (".lora_B.weight", .up), (".lora_B.bias", .upBias),
        (".lora.down.weight", .down), (".lora.up.weight", .up),
        (".lora_linear_layer.down.weight", .down), (".lora_linear_layer.up.weight", .up),
        (".down.weight", .down), (".up.weight", .up), (".alpha", .alpha),
    ]

    private static func readDiffusers(_ file: SafeTensorsFile) throws -> (Format, [String: [Module]]) {
        struct Entry { var down: String?, up: String?, upBias: String?, alpha: Float? }
        var order: [(component: String, module: String)] = []
        var parts: [String: Entry] = [:]
        var sawPeft = false
        // Older diffusers attention processors: `<attn>.processor.to_q_lora.down.weight`.
        let processorLeaves = [("to_q_lora", "to_q", "q_proj"), ("to_k_lora", "to_k", "k_proj"),
                               ("to_v_lora", "to_v", "v_proj"), ("to_out_lora", "to_out.0", "out_proj")]
        func notLoRA(_ tensor: String) -> PipelineError {
            PipelineError("\(file.path): tensor '\(tensor)' is not part of a LoRA (expected lora_A/lora_B, lora.down/lora.up or lora_down/lora_up weights)")
        }
        for tensor in file.names {
            var component = "unet", rest = Substring(tensor)
            // Longest first: `text_encoder_2.` also starts with `text_encoder`.
            for c in Self.components.reversed() where rest.hasPrefix(c + ".") {
                component = c
                rest = rest.dropFirst(c.count + 1)
                break
            }
            guard let (suffix, role) = Self.diffusersRoles.first(where: { rest.hasSuffix($0.suffix) }) else {
                if tensor.contains("lora_magnitude_vector") {
                    throw PipelineError("\(file.path): tensor '\(tensor)' is a DoRA magnitude; DoRA adapters are not supported")
                }
                throw notLoRA(tensor)
            }
            if suffix.hasPrefix(".lora_A") || suffix.hasPrefix(".lora_B") { sawPeft = true }
            var module = String(rest.dropLast(suffix.count))
            if suffix == ".down.weight" || suffix == ".up.weight" {
                // Only the attention processors' `to_q_lora.down.weight` spelling ends this way.
                guard let (leaf, unetName, clipName) = processorLeaves.first(where: { module.hasSuffix($0.0) }) else {
                    throw notLoRA(tensor)
                }
                var parent = String(module.dropLast(leaf.count + 1))
                if parent.hasSuffix(".processor") { parent = String(parent.dropLast(".processor".count)) }
                module = parent + "." + (component == "unet" ? unetName : clipName)
            }
            let key = component + "\u{0}" + module
            if parts[key] == nil { order.append((component, module)); parts[key] = Entry() }
            switch role {
            case .down: parts[key]!.down = tensor
            case .up: parts[key]!.up = tensor
            case .upBias: parts[key]!.upBias = tensor
            case .alpha: parts[key]!.alpha = try scalar(file, tensor)
            }
        }
        let config = try adapterConfigs(file)
        var out: [String: [(module: String, entry: Entry, rank: Int)]] = [:]
        for (component, module) in order {
            let e = parts[component + "\u{0}" + module]!
            guard let down = e.down, let up = e.up else {
                if e.down == nil && e.up == nil && e.upBias == nil { continue }  // an alpha alone
                throw PipelineError("\(file.path): LoRA module '\(component).\(module)' has no \(e.down == nil ? "down (lora_A)" : "up (lora_B)") weight")
            }
            out[component, default: []].append((module, e, try rank(file, down: down, up: up)))
        }
        var modules: [String: [Module]] = [:]
        for (component, list) in out {
            let fallbackAlpha = mostCommon(list.compactMap(\.entry.alpha))
            modules[component] = list.map { m in
                let scale: Float
                if let c = config[component] {
                    // peft scales by the config's rank for the module, which its factors have.
                    let r = Float(m.rank)
                    scale = c.alpha(for: m.module) / (c.useRSLoRA ? r.squareRoot() : r)
                } else {
                    scale = (m.entry.alpha ?? fallbackAlpha ?? Float(m.rank)) / Float(m.rank)
                }
                return Module(name: m.module, flattened: false, down: m.entry.down!, up: m.entry.up!, upBias: m.entry.upBias,
                              rank: m.rank, scale: scale)
            }
        }
        return (sawPeft ? .peft : .diffusers, modules)
    }

    /// peft's `LoraConfig` per component, as diffusers' `save_lora_weights` stores it
    /// (`unet.lora_alpha`, `unet.alpha_pattern`, …). A pattern key is a regular expression that
    /// matches a module whose name it ends at a dot, as peft's `re.match(rf"(.*\.)?({key})$", name)`.
    struct AdapterConfig {
        var loraAlpha: Float
        var useRSLoRA: Bool
        /// alpha_pattern, each key compiled once (nil: not a valid pattern, matched literally).
        private let alphaPattern: [(key: String, regex: Regex<AnyRegexOutput>?, alpha: Float)]

        init(loraAlpha: Float, alphaPattern: [(String, Float)], useRSLoRA: Bool) {
            self.loraAlpha = loraAlpha
            self.useRSLoRA = useRSLoRA
            self.alphaPattern = alphaPattern.map { key, alpha in (key, try? Regex("(.*\\.)?(\(key))"), alpha) }
        }

        func alpha(for module: String) -> Float {
            alphaPattern.first { p in
                if let regex = p.regex { return (try? regex.wholeMatch(in: module)) != nil }
                return module == p.key || module.hasSuffix("." + p.key)
            }?.alpha ?? loraAlpha
        }
    }

    private static func adapterConfigs(_ file: SafeTensorsFile) throws -> [String: AdapterConfig] {
        guard let raw = file.metadata.first(where: { $0.0 == "lora_adapter_metadata" })?.1 else { return [:] }
        let json: JSON
        do { json = try JSON.parse(raw) } catch {
            throw PipelineError("\(file.path): metadata lora_adapter_metadata is not valid JSON (\(error))")
        }
        var configs: [String: AdapterConfig] = [:]
        for component in Self.components {
            func value(_ key: String) -> JSON? { json["\(component).\(key)"] }
            guard let alpha = value("lora_alpha")?.double else { continue }
            if value("use_dora")?.bool == true {
                throw PipelineError("\(file.path): the \(component) adapter is DoRA (use_dora); DoRA adapters are not supported")
            }
            configs[component] = AdapterConfig(
                loraAlpha: Float(alpha),
                alphaPattern: (value("alpha_pattern")?.members ?? []).compactMap { k, v in v.double.map { (k, Float($0)) } },
                useRSLoRA: value("use_rslora")?.bool ?? false)
        }
        return configs
    }

    // MARK: Helpers

    private static func scalar(_ file: SafeTensorsFile, _ name: String) throws -> Float {
        let t = try file.tensor(name)
        guard t.count == 1, t.dtype != .bool else {
            throw PipelineError("\(file.path): '\(name)' should be one number, is \(t.dtype) \(t.shape)")
        }
        return Float(t.element(0))
    }

    private static func rank(_ file: SafeTensorsFile, down: String, up: String) throws -> Int {
        guard let d = file.info(down), let u = file.info(up), d.shape.count >= 2, u.shape.count >= 2,
              d.dtype.isFloatingPoint, u.dtype.isFloatingPoint else {
            throw PipelineError("\(file.path): '\(down)' and '\(up)' must be float matrices (or convolution kernels)")
        }
        guard d.shape[0] == u.shape[1], u.shape.dropFirst(2).allSatisfy({ $0 == 1 }), d.shape[0] > 0 else {
            throw PipelineError("\(file.path): '\(down)' \(d.shape) and '\(up)' \(u.shape) do not make a low-rank pair (down is [rank, in, …], up is [out, rank, 1, 1])")
        }
        return d.shape[0]
    }

    /// diffusers' rule for modules without their own alpha: the most common alpha of the component.
    private static func mostCommon(_ values: [Float]) -> Float? {
        var counts: [(value: Float, count: Int)] = []
        for v in values {
            if let i = counts.firstIndex(where: { $0.value == v }) { counts[i].count += 1 } else { counts.append((v, 1)) }
        }
        // The first of equally common values, as Python's Counter.most_common orders them.
        var best: (value: Float, count: Int)?
        for c in counts where c.count > (best?.count ?? 0) { best = c }
        return best?.value
    }
}

// MARK: - Applying adapters

extension LoRA {
    /// `weights` (a component's, under the model's own parameter names) with every module that
    /// `loras` hold for `component` added in. Every module must name one of `parameters` and fit
    /// its shape. `originalNames` maps a parameter to its name in the original checkpoints,
    /// which SDXL LoRAs of sd-scripts use for the UNet.
    static func adapt(_ weights: TensorSource, component: String, parameters: [ParameterDeclaration],
                      originalNames: ((String) -> String?)? = nil, loras: [LoRA]) throws -> TensorSource {
        let relevant = loras.filter { !($0.file.modules[component] ?? []).isEmpty }
        guard !relevant.isEmpty else { return weights }
        // Every spelling a module may have → the weight it adapts. A flattened spelling two
        // modules share is ambiguous (nil).
        var dotted: [String: String] = [:]
        var flat: [String: String?] = [:]
        var shapes: [String: [Int]] = [:]
        for p in parameters where p.name.hasSuffix(".weight") {
            shapes[p.name] = p.shape
            let module = String(p.name.dropLast(".weight".count))
            var spellings = [module]
            // transformers 5 saves CLIP without `text_model.`; adapters trained on either exist.
            if module.hasPrefix("text_model.") { spellings.append(String(module.dropFirst("text_model.".count))) }
            if let original = originalNames?(p.name), original.hasSuffix(".weight") {
                spellings.append(String(original.dropLast(".weight".count)))
            }
            for s in spellings {
                dotted[s] = p.name
                let key = String(s.map { $0 == "." ? "_" : $0 })
                if let existing = flat[key], existing != p.name { flat[key] = .some(nil) } else { flat[key] = p.name }
            }
        }
        var weightPatches: [String: [LoRAAdaptedWeights.Patch]] = [:]
        var biasPatches: [String: [LoRAAdaptedWeights.Patch]] = [:]
        for lora in relevant {
            let file = lora.file
            var unmatched: [String] = []
            for module in file.modules[component] ?? [] {
                let target: String?
                if module.flattened {
                    guard let entry = flat[module.name] else { unmatched.append(module.name); continue }
                    guard let name = entry else {
                        throw PipelineError("\(file.path): LoRA module '\(module.name)' could name more than one \(component) module")
                    }
                    target = name
                } else {
                    target = dotted[module.name]
                }
                guard let weight = target, let shape = shapes[weight] else { unmatched.append(module.name); continue }
                let down = file.tensors.info(module.down)!.shape, up = file.tensors.info(module.up)!.shape
                let inner = shape.dropFirst().reduce(1, *)
                guard up[0] == shape[0], down.dropFirst().reduce(1, *) == inner else {
                    throw PipelineError("\(file.path): LoRA module '\(module.name)' (down \(down), up \(up)) does not fit \(component) weight '\(weight)' of shape \(shape)")
                }
                let patch = LoRAAdaptedWeights.Patch(file: file, module: module, strength: lora.scale * module.scale)
                weightPatches[weight, default: []].append(patch)
                if let bias = module.upBias {
                    let biasName = String(weight.dropLast("weight".count)) + "bias"
                    guard weights.info(biasName) != nil, file.tensors.info(bias)?.shape == [shape[0]] else {
                        throw PipelineError("\(file.path): LoRA bias '\(bias)' does not fit \(component) (no bias '\(biasName)' of \(shape[0]) values)")
                    }
                    biasPatches[biasName, default: []].append(patch)
                }
            }
            if !unmatched.isEmpty {
                let shown = unmatched.prefix(3).map { "'\($0)'" }.joined(separator: ", ")
                throw PipelineError("\(file.path): \(unmatched.count) of its \(component) modules match nothing in this model (\(shown)\(unmatched.count > 3 ? ", …" : "")): is the LoRA for another architecture?")
            }
            Log.info("LoRA \(file.name): \(file.modules[component]!.count) \(component) modules at scale \(lora.scale)")
        }
        return LoRAAdaptedWeights(base: weights, weights: weightPatches, biases: biasPatches)
    }

    /// Fails for a component the adapters hold that the model does not have (an SDXL LoRA's
    /// second text encoder on an SD 1.x model).
    static func checkComponents(_ loras: [LoRA], present: Set<String>, model: String) throws {
        for lora in loras {
            for (component, modules) in lora.file.modules where !modules.isEmpty && !present.contains(component) {
                throw PipelineError("\(lora.file.path): adapts \(component), which \(model) does not have: is the LoRA for another architecture?")
            }
        }
    }
}

/// A component's weights with LoRA modules fused in on read: W + Σ strength · up · down, computed
/// in float32 and stored back in the weight's own dtype (diffusers' `fuse_lora`). Backends read
/// each weight once when they prepare it, so nothing is kept here.
final class LoRAAdaptedWeights: TensorSource {
    struct Patch {
        let file: LoRAFile
        let module: LoRAFile.Module
        /// The user's scale times the module's alpha / rank.
        let strength: Float
    }

    let base: TensorSource
    let weightPatches: [String: [Patch]]
    let biasPatches: [String: [Patch]]

    init(base: TensorSource, weights: [String: [Patch]], biases: [String: [Patch]]) {
        self.base = base
        weightPatches = weights
        biasPatches = biases
    }

    var origin: String { base.origin }
    var tensorNames: [String] { base.tensorNames }
    func info(_ name: String) -> (dtype: DType, shape: [Int])? { base.info(name) }
    func evict(_ name: String) { base.evict(name) }

    func tensor(_ name: String) throws -> Tensor {
        let weightPatches = self.weightPatches[name] ?? [], biasPatches = self.biasPatches[name] ?? []
        let original = try base.tensor(name)
        if weightPatches.isEmpty && biasPatches.isEmpty { return original }
        // A float32 copy to add into (the file's own tensor may be memory-mapped).
        let w = original.dtype == .float32 ? original.copy() : original.converted(to: .float32)
        let rows = w.shape[0], columns = w.count / max(rows, 1)
        for patch in weightPatches {
            let up = try patch.file.tensors.tensor(patch.module.up).converted(to: .float32)
            let down = try patch.file.tensors.tensor(patch.module.down).converted(to: .float32)
            let rank = patch.module.rank, s = patch.strength
            let (wp, upp, dp) = (w.floats, up.floats, down.floats)
            Parallel.chunks(rows) { range in
                for o in range {
                    let row = wp + o * columns
                    for j in 0..<rank {
                        let c = s * upp[o * rank + j]
                        let d = dp + j * columns
                        for k in 0..<columns { row[k] += c * d[k] }
                    }
                }
            }
        }
        for patch in biasPatches {
            let bias = try patch.file.tensors.tensor(patch.module.upBias!).converted(to: .float32)
            for i in 0..<w.count { w.floats[i] += patch.strength * bias.floats[i] }
        }
        return w.converted(to: original.dtype)
    }
}

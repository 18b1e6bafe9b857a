import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
import DiffusePipelines
import Testing

/// LoRA adapters: diffusers' own outputs where the fixture set has LoRA goldens
/// (`golden/<variant>/lora/<name>/`, made by scripts/fixtures/make_lora_reference.py), and for
/// every fixture model, adapters written here in each file format, whose fused weights must be
/// W + scale · alpha/rank · up · down for exactly the modules they name.
@Suite struct LoRATests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkLoRAs, models: Self.models, label: "LoRA", script: "make_lora_reference.py")
    }

    /// One adapted module as a test writes it: the module's weight, and the factors.
    struct Written {
        let weight: String
        let down: Tensor
        let up: Tensor
        let strength: Double  // scale · alpha / rank
    }

    /// Random factors for every `stride`-th 2-D or 4-D weight of a component.
    static func factors(_ source: TensorSource, stride: Int, rank: Int, seed: UInt64) -> [(weight: String, down: Tensor, up: Tensor)] {
        var rng = seed
        func random(_ shape: [Int]) -> Tensor {
            Tensor(shape: shape, floats: (0..<shape.reduce(1, *)).map { _ in
                rng = rng &* 6364136223846793005 &+ 1442695040888963407
                return Float(Int64(bitPattern: rng >> 11) % 2001 - 1000) / 10000
            })
        }
        // Linear and convolution weights (CLIP's embedding tables are not linears: peft lays
        // their factors out the other way round).
        let weights = source.tensorNames.filter {
            $0.hasSuffix(".weight") && [2, 4].contains(source.info($0)!.shape.count) && !$0.contains("_embedding.")
        }
        return weights.enumerated().compactMap { i, name in
            guard i % stride == 0 else { return nil }
            let shape = source.info(name)!.shape
            let r = i % (2 * stride) == 0 ? rank : rank + 1  // ranks differ between modules
            let down = shape.count == 4 ? [r, shape[1], shape[2], shape[3]] : [r, shape[1]]
            let up = shape.count == 4 ? [shape[0], r, 1, 1] : [shape[0], r]
            return (name, random(down), random(up))
        }
    }

    /// Each component's weights as the model loaded them (the names a LoRA's modules resolve to).
    static func componentWeights(_ c: StableDiffusionComponents) -> [(String, TensorSource)] {
        var list: [(String, TensorSource)] = [("unet", c.unetWeights.source), ("text_encoder", c.textEncoder!.weights.source)]
        if let te2 = c.textEncoder2 { list.append(("text_encoder_2", te2.weights.source)) }
        return list
    }

    /// The adapted weights must be W + Σ strength · up · down (in float64 here), and every other
    /// weight untouched.
    static func expectAdapted(_ adapted: StableDiffusionComponents, _ base: StableDiffusionComponents,
                              _ written: [String: [Written]], label: String) throws {
        let baseWeights = Dictionary(uniqueKeysWithValues: componentWeights(base))
        for (component, source) in componentWeights(adapted) {
            let patches = Dictionary(grouping: written[component] ?? [], by: \.weight)
            for name in source.tensorNames {
                let adaptedTensor = try source.tensor(name)
                let got = adaptedTensor.toFloatArray(), w = try baseWeights[component]!.tensor(name).toFloatArray()
                guard let list = patches[name] else {
                    #expect(got == w, "\(label): \(component) \(name) changed but no module names it")
                    continue
                }
                var want = w.map(Double.init)
                let columns = w.count / max(adaptedTensor.shape[0], 1)
                for p in list {
                    let (d, u) = (p.down.toFloatArray(), p.up.toFloatArray())
                    let r = p.down.shape[0]
                    for o in 0..<(w.count / columns) {
                        for j in 0..<r {
                            let c = p.strength * Double(u[o * r + j])
                            for k in 0..<columns { want[o * columns + k] += c * Double(d[j * columns + k]) }
                        }
                    }
                }
                let err = zip(got, want).map { abs(Double($0) - $1) / max(1, abs($1)) }.max() ?? 0
                #expect(err < 1e-5, "\(label): \(component) \(name) is off by \(err)")
            }
        }
    }

    @Test(arguments: models) func kohyaFiles(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let unetConfig = try ConfigFile(path: Files.join(model.folder, "unet", "config.json"))
        let original = try LDMKeyTables.unet(config: unetConfig, sourcePrefix: "")
        let xl = base.textEncoder2 != nil
        // sd-scripts spells the UNet's modules with diffusers' names for SD 1.x/2.x and the
        // original ones for SDXL; both spellings are written for every model.
        for sgm in [false, true] {
            let dir = try TemporaryDirectory()
            var tensors: [(String, Tensor)] = []
            var written: [String: [Written]] = [:]
            let alpha: Float = 5
            for (component, source) in Self.componentWeights(base) {
                let prefix = component == "unet" ? "lora_unet_" : component == "text_encoder_2" ? "lora_te2_" : (xl ? "lora_te1_" : "lora_te_")
                for (i, f) in Self.factors(source, stride: 3, rank: 2, seed: UInt64(component.count * 7 + (sgm ? 1 : 0))).enumerated() {
                    var module = String(f.weight.dropLast(".weight".count))
                    if component == "unet" && sgm {
                        guard let name = original.source(forTarget: f.weight)?.name else { continue }
                        module = String(name.dropLast(".weight".count))
                    }
                    let key = prefix + String(module.map { $0 == "." ? "_" : $0 })
                    tensors += [("\(key).lora_down.weight", f.down), ("\(key).lora_up.weight", f.up)]
                    // One module without its own alpha: diffusers gives it the most common one.
                    if i != 1 { tensors.append(("\(key).alpha", Tensor(shape: [], floats: [alpha]))) }
                    written[component, default: []].append(Written(weight: f.weight, down: f.down, up: f.up,
                                                                   strength: 0.7 * Double(alpha) / Double(f.down.shape[0])))
                }
            }
            let path = dir.join("kohya.safetensors")
            try SafeTensors.write(tensors, to: path)
            let lora = try LoRA.open(path + ":0.7")
            #expect(lora.file.format == .kohya && lora.scale == 0.7)
            let adapted = try StableDiffusionComponents.load(model.folder, loras: [lora])
            try Self.expectAdapted(adapted, base, written, label: "\(model.variant) kohya\(sgm ? " (SGM names)" : "")")
        }
    }

    @Test(arguments: models) func diffusersFiles(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        // peft with its adapter config in the metadata (alpha and rank patterns, rsLoRA), and the
        // older diffusers spelling with network alphas; text encoders without `text_model.`,
        // as transformers 5 names them.
        for style in ["peft", "peft-rslora", "legacy"] {
            let dir = try TemporaryDirectory()
            var tensors: [(String, Tensor)] = []
            var written: [String: [Written]] = [:]
            var metadata: [(String, JSON)] = []
            for (component, source) in Self.componentWeights(base) {
                let factors = Self.factors(source, stride: 4, rank: 3, seed: UInt64(component.count * 11 + style.count))
                // The first module's leaf gets its own alpha through the pattern.
                let special = factors.first.map { String($0.weight.dropLast(".weight".count).split(separator: ".").suffix(2).joined(separator: ".")) }
                metadata += [("\(component).r", .number(3)), ("\(component).lora_alpha", .number(6)),
                             ("\(component).alpha_pattern", .object(special.map { [($0, .number(1.5))] } ?? [])),
                             ("\(component).rank_pattern", .object(factors.filter { $0.down.shape[0] != 3 }.map { f in
                                 var module = String(f.weight.dropLast(".weight".count))
                                 if module.hasPrefix("text_model.") { module = String(module.dropFirst("text_model.".count)) }
                                 return ("^" + module, .number(Double(f.down.shape[0])))
                             })),
                             ("\(component).use_rslora", .bool(style == "peft-rslora"))]
                for f in factors {
                    var module = String(f.weight.dropLast(".weight".count))
                    if module.hasPrefix("text_model.") { module = String(module.dropFirst("text_model.".count)) }
                    let rank = Double(f.down.shape[0])
                    let strength: Double
                    if style == "legacy" {
                        tensors += [("\(component).\(module).lora.down.weight", f.down), ("\(component).\(module).lora.up.weight", f.up),
                                    ("\(component).\(module).alpha", Tensor(shape: [], floats: [2]))]
                        strength = 2 / rank
                    } else {
                        tensors += [("\(component).\(module).lora_A.weight", f.down), ("\(component).\(module).lora_B.weight", f.up)]
                        let matched = special.map { module == $0 || module.hasSuffix("." + $0) } ?? false
                        let alpha = matched ? 1.5 : 6
                        strength = alpha / (style == "peft-rslora" ? rank.squareRoot() : rank)
                    }
                    written[component, default: []].append(Written(weight: f.weight, down: f.down, up: f.up, strength: 1.2 * strength))
                }
            }
            let path = dir.join("adapter.safetensors")
            try SafeTensors.write(tensors, metadata: style == "legacy" ? [] : [("lora_adapter_metadata", JSON.object(metadata).serialized())],
                                  to: path)
            let lora = LoRA(file: try LoRAFile(path: path), scale: 1.2)
            #expect(lora.file.format == (style == "legacy" ? .diffusers : .peft))
            let adapted = try StableDiffusionComponents.load(model.folder, loras: [lora])
            try Self.expectAdapted(adapted, base, written, label: "\(model.variant) \(style)")
        }
    }

    @Test func badAdaptersAreRefusedByName() throws {
        let model = try #require(Self.models.first { $0.variant.contains("sd15") } ?? Self.models.first)
        let base = try StableDiffusionComponents.load(model.folder)
        let dir = try TemporaryDirectory()
        let weight = try #require(base.unetWeights.source.tensorNames.first { $0.hasSuffix("to_q.weight") })
        let shape = base.unetWeights.source.info(weight)!.shape
        let module = "lora_unet_" + String(weight.dropLast(".weight".count).map { $0 == "." ? "_" : $0 })
        func attempt(_ tensors: [(String, Tensor)]) -> String {
            let path = dir.join("bad-\(UInt32.random(in: 0 ... .max)).safetensors")
            do {
                try SafeTensors.write(tensors, to: path)
                _ = try StableDiffusionComponents.load(model.folder, loras: [try LoRA.open(path)])
                return "loaded"
            } catch { return "\(error)" }
        }
        let down = Tensor(zeros: [2, shape[1]]), up = Tensor(zeros: [shape[0], 2])
        let good = [("\(module).lora_down.weight", down), ("\(module).lora_up.weight", up)]
        #expect(attempt(good) == "loaded")
        // A module the model does not have is named, not skipped.
        let unknown = attempt(good + [("lora_unet_no_such_block_to_q.lora_down.weight", down), ("lora_unet_no_such_block_to_q.lora_up.weight", up)])
        #expect(unknown.contains("no_such_block_to_q") && unknown.contains("match nothing"), "\(unknown)")
        // Factors that do not fit the weight.
        let misfit = attempt([("\(module).lora_down.weight", Tensor(zeros: [2, shape[1] + 1])), ("\(module).lora_up.weight", up)])
        #expect(misfit.contains(weight) && misfit.contains("does not fit"), "\(misfit)")
        // A lone half of a pair.
        let half = attempt([("\(module).lora_down.weight", down)])
        #expect(half.contains(module) && half.contains("lora_up"), "\(half)")
        // LyCORIS adapters are another method, refused by name.
        let loha = attempt([("\(module).hada_w1_a", down), ("\(module).hada_w1_b", up)])
        #expect(loha.contains("hada_w1_a") && loha.contains("LyCORIS"), "\(loha)")
        // An SDXL LoRA's second text encoder on a model without one.
        if base.textEncoder2 == nil {
            let te2 = attempt(good + [("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", down),
                                      ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", up)])
            #expect(te2.contains("text_encoder_2"), "\(te2)")
        }
        // Not a safetensors file at all.
        try Files.write(Array("not a lora".utf8), to: dir.join("text.safetensors"))
        #expect(throws: (any Error).self) { try LoRA.open(dir.join("text.safetensors")) }
    }

    @Test func commandLineFusesAndRecordsTheAdapter() throws {
        let model = try #require(Self.models.first { $0.variant.contains("sd15") } ?? Self.models.first)
        let base = try StableDiffusionComponents.load(model.folder)
        let dir = try TemporaryDirectory()
        var tensors: [(String, Tensor)] = []
        for f in Self.factors(base.unetWeights.source, stride: 2, rank: 4, seed: 5) {
            let key = "lora_unet_" + String(f.weight.dropLast(".weight".count).map { $0 == "." ? "_" : $0 })
            tensors += [("\(key).lora_down.weight", f.down), ("\(key).lora_up.weight", f.up)]
        }
        let lora = dir.join("style.safetensors")
        try SafeTensors.write(tensors, to: lora)
        let inspect = try runDiffuse(["inspect", lora])
        #expect(inspect.status == 0 && inspect.out.contains("LoRA adapter, kohya format")
                && inspect.out.contains("unet: \(tensors.count / 2) modules"), "\(inspect.out)\(inspect.err)")
        func generate(_ extra: [String], _ out: String) throws -> ImageFile {
            let run = try runDiffuse(["generate", "a red fox", "--model", model.folder, "--steps", "2", "--size", "64x64",
                                      "--seed", "3", "--device", "cpu", "--output", dir.join(out)] + extra)
            #expect(run.status == 0, "exit \(run.status): \(run.err)")
            return try ImageFile.read(dir.join(out))
        }
        let plain = try generate([], "plain.png")
        let off = try generate(["--lora", lora + ":0"], "off.png")
        let on = try generate(["--lora", lora + ":1.5"], "on.png")
        #expect(off.image == plain.image, "a LoRA at scale 0 changed the image")
        #expect(on.image != plain.image, "the LoRA changed nothing")
        #expect(on.text("parameters")?.contains("Lora: \"style.safetensors:1.5\"") == true, "\(on.text("parameters") ?? "")")
    }
}

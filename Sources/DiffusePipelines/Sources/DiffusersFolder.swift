import DiffuseCore

/// A diffusers pipeline folder: `model_index.json` and one folder per component.
enum DiffusersFolder {
    /// Components not built as pipeline parts, their folders possibly absent: the safety checker
    /// and the picture encoders, which the pipelines load from the folder themselves (the checker
    /// with its `feature_extractor`, when present; image variation's and unCLIP's `image_encoder`,
    /// depth to image's `depth_estimator`, with theirs).
    static let unusedComponents: Set<String> = ["safety_checker", "feature_extractor", "image_encoder", "depth_estimator"]

    /// Model classes that an unlisted folder may hold as an extra component (`vae_tiny/`).
    static let extraModelClasses: Set<String> = ["AutoencoderTiny", "AutoencoderKL", "UNet2DConditionModel"]

    struct Entry {
        let name: String
        let library: String
        let className: String
    }

    /// model_index.json's pipeline class and components (used, and listed but unused).
    static func componentEntries(_ index: ConfigFile) throws -> (pipelineClass: String, used: [Entry], skipped: [(name: String, className: String)]) {
        let json = try index.object()
        guard let pipelineClass = json["_class_name"]?.string else {
            throw ModelSourceError.invalidConfig(file: index.origin, detail: "has no \"_class_name\" (the pipeline class)")
        }
        var used: [Entry] = []
        var skipped: [(name: String, className: String)] = []
        for (key, value) in json.members ?? [] where !key.hasPrefix("_") {
            // Components are [library, class] pairs; other values are the pipeline's settings.
            guard let pair = value.array else { continue }
            if pair.count == 2 && pair[0].isNull && pair[1].isNull { continue }  // the pipeline has no such component
            guard pair.count == 2, let library = pair[0].string, let className = pair[1].string else {
                throw ModelSourceError.invalidConfig(file: index.origin, detail: "\"\(key)\": \(value) is not [library, class]")
            }
            if unusedComponents.contains(key) {
                skipped.append((key, className))
            } else {
                used.append(Entry(name: key, library: library, className: className))
            }
        }
        guard !used.isEmpty else {
            throw ModelSourceError.invalidConfig(file: index.origin, detail: "lists no components")
        }
        return (pipelineClass, used, skipped)
    }

    static func open(_ folder: String, origin: String, kind: ModelSource.Kind, options: ModelSourceOptions) throws -> ModelSource {
        let indexPath = Files.join(folder, "model_index.json")
        try Links.checkNotDangling(indexPath)
        guard Files.exists(indexPath) else { throw notAPipeline(folder) }
        let index = try ConfigFile(path: indexPath)
        let entries = try componentEntries(index)

        var components: [ComponentSource] = []
        for entry in entries.used {
            let dir = Files.join(folder, entry.name)
            guard Files.isDirectory(dir) else {
                throw ModelSourceError.missingComponentFolder(component: entry.name, className: entry.className, folder: dir, modelIndex: indexPath)
            }
            components.append(try component(name: entry.name, library: entry.library, className: entry.className, folder: dir,
                                            variant: options.variant, listedIn: indexPath))
        }
        // Folders that model_index.json does not list but that hold a model diffusers can load
        // (the reference models keep their tiny autoencoder in `vae_tiny/`).
        // An extra that does not open is left out with a note: the pipeline does not need it.
        let listed = Set(entries.used.map(\.name) + entries.skipped.map(\.name))
        var notes: [String] = []
        for name in try Files.list(folder) where !listed.contains(name) && !name.hasPrefix(".") {
            let dir = Files.join(folder, name)
            let configPath = Files.join(dir, "config.json")
            guard Files.isDirectory(dir), Files.exists(configPath),
                  let className = try? ConfigFile(path: configPath).json()["_class_name"]?.string,
                  extraModelClasses.contains(className) else { continue }
            do {
                components.append(try component(name: name, library: "diffusers", className: className, folder: dir,
                                                variant: options.variant, listedIn: nil))
            } catch {
                notes.append("the extra folder \(name) (\(className)) was not loaded: \(error)")
            }
        }

        if let variant = options.variant, !components.contains(where: { $0.variant == variant }) {
            throw ModelSourceError.variant(detail: "\(folder): no component has \(variant) weights (asked for variant \"\(variant)\"); "
                                                + "leave the variant out to read the default weights")
        }
        return ModelSource(origin: origin, path: folder, kind: kind, pipelineClass: entries.pipelineClass, modelIndex: index,
                           components: components, skipped: entries.skipped,
                           notes: components.flatMap { c in c.notes.map { "\(c.name): \($0)" } } + notes)
    }

    /// Why a folder without model_index.json is not a pipeline, and what it might be instead.
    static func notAPipeline(_ folder: String) -> ModelSourceError {
        let configPath = Files.join(folder, "config.json")
        if Files.exists(configPath) {
            let className = (try? ConfigFile(path: configPath).json()["_class_name"]?.string) ?? nil
            let what = className.map { "one component (\($0))" } ?? "one component"
            return .notAPipeline(folder: folder, detail: "model_index.json is missing; its config.json makes it \(what), "
                                    + "not a whole pipeline: point at the folder that holds model_index.json")
        }
        let files = (try? Files.list(folder)) ?? []
        if let file = files.first(where: { $0.hasSuffix(".safetensors") }) {
            return .notAPipeline(folder: folder, detail: "model_index.json is missing; to open \(file) as a single-file checkpoint, point at the file")
        }
        return .notAPipeline(folder: folder, detail: "model_index.json is missing")
    }

    /// One component folder: its config and weights, scheduler config, or tokenizer files.
    static func component(name: String, library: String?, className: String, folder: String, variant: String?,
                          listedIn index: String?) throws -> ComponentSource {
        switch ComponentKind(className: className) {
        case .scheduler:
            let path = Files.join(folder, "scheduler_config.json")
            try Links.checkNotDangling(path)
            guard Files.exists(path) else { throw ModelSourceError.missingFile(component: name, path: path) }
            let config = try ConfigFile(path: path)
            _ = try config.object()
            return ComponentSource(name: name, library: library, className: className, config: config, weights: nil, location: folder)

        case .tokenizer:
            // vocab.json and merges.txt, or transformers 5's tokenizer.json alone.
            let fast = Files.join(folder, "tokenizer.json")
            try Links.checkNotDangling(fast)
            let slow = ["vocab.json", "merges.txt"].map { Files.join(folder, $0) }
            for path in slow { try Links.checkNotDangling(path) }
            if !(Files.exists(fast) && !slow.contains(where: Files.exists)) {
                for path in slow where !Files.exists(path) { throw ModelSourceError.missingFile(component: name, path: path) }
            }
            return ComponentSource(name: name, library: library, className: className, config: nil, weights: nil,
                                   tokenizer: .folder(folder), location: folder)

        case .model:
            let configPath = Files.join(folder, "config.json")
            try Links.checkNotDangling(configPath)
            guard Files.exists(configPath) else { throw ModelSourceError.missingFile(component: name, path: configPath) }
            let config = try ConfigFile(path: configPath)
            let json = try config.object()
            // diffusers configs name their class; it must be the one model_index.json lists.
            if let index, library == "diffusers", let own = json["_class_name"]?.string, own != className {
                throw ModelSourceError.inconsistent(detail: "\(configPath) has _class_name \(own), but \(index) lists \(className) for '\(name)'")
            }
            let found = try WeightFiles.open(folder: folder, component: name, library: library, variant: variant)
            var weights = found.source
            if className == "AutoencoderKL" { weights = try DeprecatedAttentionNames.view(weights) }
            return ComponentSource(name: name, library: library, className: className, config: config, weights: weights,
                                   location: folder, variant: found.variant, notes: found.note.map { [$0] } ?? [])
        }
    }
}

/// The weights of one component folder, by diffusers' and transformers' file names: safetensors
/// when present, else PyTorch's `.bin` (read as data, never unpickled by running it), as
/// diffusers prefers them.
enum WeightFiles {
    static func open(folder: String, component: String, library: String?, variant: String?) throws
        -> (source: TensorSource, variant: String?, note: String?) {
        let files = try Files.list(folder)
        let present = Set(files)
        let bases = library == "transformers" ? ["model", "diffusion_pytorch_model"] : ["diffusion_pytorch_model", "model"]
        let binBases = library == "transformers" ? ["pytorch_model", "diffusion_pytorch_model"] : ["diffusion_pytorch_model", "pytorch_model"]
        // diffusers' `_add_variant`: the variant goes before the last extension.
        func names(_ v: String?, _ bases: [String], _ ext: String) -> [String] {
            bases.flatMap { b in
                v.map { ["\(b).\($0).\(ext)", "\(b).\(ext).index.\($0).json"] } ?? ["\(b).\(ext)", "\(b).\(ext).index.json"]
            }
        }
        func names(_ v: String?) -> [String] { names(v, bases, "safetensors") + names(v, binBases, "bin") }
        func openFirst(_ v: String?) throws -> TensorSource? {
            guard let name = names(v).first(where: present.contains) else { return nil }
            let path = Files.join(folder, name)
            try Links.checkNotDangling(path)
            // An index is `….safetensors.index.json`, or `….safetensors.index.<variant>.json`.
            return name.hasSuffix(".json") ? try ShardedTensorFiles(indexPath: path) : try TensorFiles.open(path)
        }

        if let variant {
            if let source = try openFirst(variant) { return (source, variant, nil) }
            if let source = try openFirst(nil) {
                return (source, nil, "has no \(variant) weights; reading the default ones, as diffusers does")
            }
        } else {
            if let source = try openFirst(nil) { return (source, nil, nil) }
            let variants = variantsPresent(files, bases: bases + binBases)
            if variants.count == 1, let only = variants.first, let source = try openFirst(only) {
                return (source, only, "only \(only) weights are present; reading them")
            }
            if variants.count > 1 {
                throw ModelSourceError.variant(detail: "component '\(component)': \(folder) has only variant weights "
                                                    + "(\(variants.joined(separator: ", "))); choose one with the variant option")
            }
        }
        throw ModelSourceError.missingWeights(component: component, folder: folder, expected: names(variant), found: files)
    }

    /// `fp16` of `diffusion_pytorch_model.fp16.safetensors` / `model.safetensors.index.fp16.json`.
    static func variantsPresent(_ files: [String], bases: [String]) -> [String] {
        var found: [String] = []
        for file in files {
            for base in bases {
                var middle: Substring?
                for ext in [".safetensors", ".bin"] {
                    if file.hasPrefix(base + ext + ".index."), file.hasSuffix(".json") {
                        middle = file.dropFirst(base.count + ext.count + ".index.".count).dropLast(".json".count)
                    } else if file.hasPrefix(base + "."), file.hasSuffix(ext) {
                        middle = file.dropFirst(base.count + 1).dropLast(ext.count)
                    }
                }
                if let middle, !middle.isEmpty, !middle.contains("."), !found.contains(String(middle)) { found.append(String(middle)) }
            }
        }
        return found.sorted()
    }
}

/// Older diffusers saved the VAE's attention as `query`/`key`/`value`/`proj_attn` (SD 1.5's own
/// VAE still is); diffusers renames them on load (`_convert_deprecated_attention_blocks`), and so
/// does this view, so that models see one set of names.
enum DeprecatedAttentionNames {
    static let renames = [("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0.")]

    static func view(_ source: TensorSource) throws -> TensorSource {
        // `….attentions.<n>.query.weight` → `….attentions.<n>.to_q.weight`
        func renamed(_ name: String) -> String? {
            let parts = name.split(separator: ".", omittingEmptySubsequences: false)
            guard let i = parts.firstIndex(of: "attentions"), i + 2 < parts.count, Int(parts[i + 1]) != nil else { return nil }
            let head = parts[...(i + 1)].joined(separator: ".") + "."
            let leaf = parts[(i + 2)...].joined(separator: ".")
            for (old, new) in renames where leaf.hasPrefix(old) { return head + new + leaf.dropFirst(old.count) }
            return nil
        }
        guard source.tensorNames.contains(where: { renamed($0) != nil }) else { return source }
        return try MappedTensorSource(base: source, entries: source.tensorNames.map {
            (name: renamed($0) ?? $0, entry: MappedTensorSource.Entry(source: $0))
        }, origin: source.origin)
    }
}

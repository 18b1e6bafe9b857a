import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseTokenizer

/// A textual-inversion embedding and the token that calls it up in a prompt
/// (`--embedding PATH[:TOKEN]`; diffusers' `load_textual_inversion(path, token=)`).
///
/// Each vector becomes a new row of the text encoder's token-embedding table and a new token of
/// its tokenizer: `token` for the first, `token_1` … for the others, and `token` in a prompt
/// stands for all of them. The files people have (`.safetensors`, or PyTorch's `.pt`/`.bin`, read
/// as data by `TorchCheckpointFile`):
/// - diffusers' `learned_embeds.safetensors`: one tensor named after its token (`"<cat-toy>"`);
/// - AUTOMATIC1111's: one tensor `emb_params` (or `string_to_param.*`) [n, d];
/// - SDXL's: `clip_l` [n, 768] and `clip_g` [n, 1280], one table per text encoder.
/// Without a token, a file whose tensor is named after its token uses that name, the others
/// their file name without the extension (what AUTOMATIC1111 users write in prompts).
public struct TextualInversion {
    public let path: String
    public let token: String
    /// The vectors [n, d] in float32: one table for whichever encoder has width d, or one per
    /// encoder (`text_encoder`, `text_encoder_2`) for SDXL files.
    public let vectors: Vectors

    public enum Vectors {
        case single(Tensor)
        case perEncoder([String: Tensor])
    }

    /// The file's name without folders, for messages and the PNG's parameters.
    public var name: String { Files.lastComponent(path) }

    /// Its token and vectors, per text encoder for SDXL files.
    public var summary: [String] {
        switch vectors {
        case .single(let t):
            return ["token '\(token)': \(t.shape[0]) vector\(t.shape[0] == 1 ? "" : "s") of width \(t.shape[1])"]
        case .perEncoder(let tables):
            return ["token '\(token)': \(tables.sorted { $0.key < $1.key }.map { "\($0.value.shape[0]) vectors of width \($0.value.shape[1]) for \($0.key)" }.joined(separator: ", "))"]
        }
    }

    /// `PATH` or `PATH:TOKEN` (a path that exists as given is never split at a colon).
    public static func open(_ argument: String) throws -> TextualInversion {
        if !Files.exists(argument), let colon = argument.lastIndex(of: ":"), colon != argument.startIndex,
           argument.index(after: colon) != argument.endIndex {
            return try TextualInversion(path: String(argument[..<colon]), token: String(argument[argument.index(after: colon)...]))
        }
        return try TextualInversion(path: argument)
    }

    public init(path: String, token: String? = nil) throws {
        self.path = path
        let file: TensorSource
        do { file = try TensorFiles.open(path) } catch { throw PipelineError("embedding \(error)") }
        func table(_ name: String) throws -> Tensor {
            let info = file.info(name)!
            guard info.dtype.isFloatingPoint, info.shape.count == 1 || info.shape.count == 2, info.shape.allSatisfy({ $0 > 0 }) else {
                throw PipelineError("\(path): tensor '\(name)' (\(info.dtype) \(info.shape)) is not an embedding: expected floats [vectors, width] or [width]")
            }
            let t = try file.tensor(name).converted(to: .float32)
            return t.reshaped(info.shape.count == 1 ? [1, info.shape[0]] : info.shape)
        }
        let names = Set(file.tensorNames)
        let fileName = Files.lastComponent(path)
        let stem = fileName.lastIndex(of: ".").map { String(fileName[..<$0]) } ?? fileName
        if names == ["clip_l", "clip_g"] {
            let l = try table("clip_l"), g = try table("clip_g")
            guard l.shape[0] == g.shape[0] else {
                throw PipelineError("\(path): clip_l has \(l.shape[0]) vectors but clip_g \(g.shape[0]); an SDXL embedding has as many of each")
            }
            vectors = .perEncoder(["text_encoder": l, "text_encoder_2": g])
            self.token = token ?? stem
        } else if names.count == 1, let only = names.first {
            vectors = .single(try table(only))
            // AUTOMATIC1111's tensor names say nothing of the token; diffusers' name it.
            self.token = token ?? (only == "emb_params" || only.hasPrefix("string_to_param") ? stem : only)
        } else {
            let shown = file.tensorNames.prefix(4).map { "'\($0)'" }.joined(separator: ", ")
            throw PipelineError("\(path): \(names.count) tensors (\(shown)\(names.count > 4 ? ", …" : "")) is not a textual-inversion embedding: expected one tensor, or clip_l and clip_g")
        }
        guard !self.token.isEmpty else { throw PipelineError("\(path): give the embedding a token (--embedding \(path):TOKEN)") }
    }

    /// The vectors for the text encoder named `component` of width `width`, nil when this
    /// embedding is not for it. `widths` holds every text encoder's width (one table goes to the
    /// encoder it fits).
    func vectors(for component: String, widths: [String: Int]) throws -> Tensor? {
        switch vectors {
        case .perEncoder(let tables):
            guard let t = tables[component] else { return nil }
            guard t.shape[1] == widths[component] else {
                throw PipelineError("\(path): its \(component == "text_encoder" ? "clip_l" : "clip_g") vectors are \(t.shape[1]) wide but the model's \(component) takes \(widths[component] ?? 0): is the embedding for another architecture?")
            }
            return t
        case .single(let t):
            return t.shape[1] == widths[component] ? t : nil
        }
    }

    /// Fails for an embedding that fits none of the model's text encoders, or (an SDXL file) names
    /// one the model lacks.
    static func check(_ embeddings: [TextualInversion], widths: [String: Int], model: String) throws {
        var seen: [String: String] = [:]
        for e in embeddings {
            if let other = seen[e.token] {
                throw PipelineError("\(e.path) and \(other) both use the token '\(e.token)': give one another token (--embedding FILE:TOKEN)")
            }
            seen[e.token] = e.path
            switch e.vectors {
            case .perEncoder(let tables):
                let missing = tables.keys.sorted().filter { widths[$0] == nil }
                if missing == ["text_encoder"] && widths["text_encoder_2"] != nil {
                    // The SDXL refiner: diffusers' recipe loads clip_g into its one encoder.
                    Log.info("\(e.name): \(model) has no first text encoder (an SDXL refiner), so only its clip_g vectors are used")
                } else if let component = missing.first {
                    throw PipelineError("\(e.path): an SDXL embedding (clip_l and clip_g) but \(model) has no \(component): is the embedding for another architecture?")
                }
            case .single(let t):
                if !widths.values.contains(t.shape[1]) {
                    let have = widths.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
                    throw PipelineError("\(e.path): vectors \(t.shape[1]) wide fit no text encoder of \(model) (\(have)): is the embedding for another architecture?")
                }
                if widths.count > 1, let missing = widths.first(where: { $0.value != t.shape[1] }) {
                    Log.warning("\(e.name): one table \(t.shape[1]) wide, so only the encoder of that width learns '\(e.token)'; \(missing.key) reads it as plain text")
                }
            }
        }
    }

    /// A text encoder with the embeddings meant for it added (tokens to its tokenizer, rows to
    /// its token-embedding table, the config's vocab_size grown to match), as diffusers'
    /// `load_textual_inversion` followed by `resize_token_embeddings`.
    static func extend(_ component: TextEncoderComponent, name: String, embeddings: [TextualInversion],
                       widths: [String: Int]) throws -> TextEncoderComponent {
        var tokenizer = component.tokenizer
        var rows: [(id: Int, vector: [Float])] = []
        for e in embeddings {
            guard let t = try e.vectors(for: name, widths: widths) else { continue }
            let added: (tokenizer: CLIPTokenizer, ids: [Int])
            do { added = try tokenizer.addingEmbeddingTokens(e.token, vectors: t.shape[0]) } catch {
                throw PipelineError("\(e.path): \(error)")
            }
            tokenizer = added.tokenizer
            let width = t.shape[1]
            for (i, id) in added.ids.enumerated() { rows.append((id, Array(UnsafeBufferPointer(start: t.floats + i * width, count: width)))) }
            Log.info("embedding \(e.name): '\(e.token)' is \(t.shape[0]) vector\(t.shape[0] == 1 ? "" : "s") of \(name)")
        }
        if rows.isEmpty { return component }
        var config = component.encoder.config
        config.vocabSize = tokenizer.vocabSize
        let encoder: any CLIPTextEncoder = component.encoder.hasTextProjection
            ? try CLIPTextModelWithProjection(config: config) : try CLIPTextModel(config: config)
        guard let table = encoder.parameters.first(where: { $0.name.hasSuffix("embeddings.token_embedding.weight") })?.name else {
            throw PipelineError("\(name) has no token-embedding table to add embeddings to")
        }
        let extended = ExtendedEmbeddingTable(base: component.weights.source, table: table, rows: config.vocabSize, added: rows)
        return TextEncoderComponent(tokenizer: tokenizer, encoder: encoder, weights: ModelWeights(extended))
    }
}

/// A text encoder's weights with its token-embedding table grown to `rows` rows, new rows set
/// to the embeddings' vectors (stored in the table's own dtype, as diffusers assigns them).
final class ExtendedEmbeddingTable: TensorSource {
    let base: TensorSource
    let table: String
    let rows: Int
    let added: [(id: Int, vector: [Float])]

    init(base: TensorSource, table: String, rows: Int, added: [(id: Int, vector: [Float])]) {
        self.base = base
        self.table = table
        self.rows = rows
        self.added = added
    }

    var origin: String { base.origin }
    var tensorNames: [String] { base.tensorNames }
    func evict(_ name: String) { base.evict(name) }

    func info(_ name: String) -> (dtype: DType, shape: [Int])? {
        guard let info = base.info(name) else { return nil }
        return name == table ? (info.dtype, [rows] + info.shape.dropFirst()) : info
    }

    func tensor(_ name: String) throws -> Tensor {
        let original = try base.tensor(name)
        guard name == table else { return original }
        let width = original.shape[1], kept = min(original.shape[0], rows)
        let grown = Tensor(zeros: [rows, width], dtype: .float32)
        let source = original.converted(to: .float32)
        grown.floats.update(from: source.floats, count: kept * width)
        for (id, vector) in added { (grown.floats + id * width).update(from: vector, count: width) }
        return grown.converted(to: original.dtype)
    }
}

import DiffuseCore
import DiffuseGraph
import FoundationEssentials

/// A configuration value the engine cannot run, named by its `config.json` key. Models throw it
/// when they are built, before any weight is read.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    /// The model class (`UNet2DConditionModel`, `CLIPTextModel`, ...).
    public let model: String
    /// The `config.json` key, with an index for list entries (`down_block_types[2]`).
    public let key: String
    /// The offending value as it reads in JSON.
    public let value: String
    /// Why it is rejected.
    public let reason: String

    public init(model: String, key: String, value: String, reason: String) {
        self.model = model
        self.key = key
        self.value = value
        self.reason = reason
    }

    public var description: String { "\(model) config: \(key) = \(value) is not supported: \(reason)" }
}

/// A `config.json` that cannot be read: the file and what is wrong with it.
public struct ConfigFileError: Error, CustomStringConvertible {
    public let path: String
    public let message: String
    public var description: String { "\(path): \(message)" }
}

/// Loads a `Codable` configuration from a `config.json`; errors name the file and the key.
public func loadConfiguration<C: Decodable>(_ type: C.Type, from path: String) throws -> C {
    let bytes = try Files.read(path)
    return try decodeConfiguration(type, from: bytes, origin: path)
}

/// Decodes a configuration from JSON text; `origin` names it in errors.
public func decodeConfiguration<C: Decodable>(_ type: C.Type, from bytes: [UInt8], origin: String) throws -> C {
    do {
        return try JSONDecoder().decode(type, from: Data(bytes))
    } catch let error as DecodingError {
        throw ConfigFileError(path: origin, message: describe(error))
    } catch {
        throw ConfigFileError(path: origin, message: "\(error)")
    }
}

private func describe(_ error: DecodingError) -> String {
    func path(_ ctx: DecodingError.Context) -> String {
        let p = ctx.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
        return p.hasPrefix(".") ? String(p.dropFirst()) : p
    }
    switch error {
    case .typeMismatch(_, let ctx), .valueNotFound(_, let ctx):
        return "\(path(ctx)): \(ctx.debugDescription)"
    case .keyNotFound(let key, let ctx):
        let at = path(ctx)
        return "missing key \(at.isEmpty ? "" : at + ".")\(key.stringValue)"
    case .dataCorrupted(let ctx):
        let at = path(ctx)
        return at.isEmpty ? "invalid JSON: \(ctx.debugDescription)" : "\(at): \(ctx.debugDescription)"
    @unknown default:
        return "\(error)"
    }
}

/// A config value that diffusers accepts either as one integer for every block or as a list
/// with one entry per block (`attention_head_dim`, `layers_per_block`, ...).
public enum IntOrList: Codable, Sendable, Equatable, CustomStringConvertible {
    case int(Int)
    case list([Int])

    public init(from decoder: Swift.Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let i = try? c.decode(Int.self) { self = .int(i); return }
        if let l = try? c.decode([Int].self) { self = .list(l); return }
        throw DecodingError.typeMismatch(IntOrList.self, .init(codingPath: decoder.codingPath,
                                                               debugDescription: "expected an integer or a list of integers"))
    }

    public func encode(to encoder: Swift.Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .int(let i): try c.encode(i)
        case .list(let l): try c.encode(l)
        }
    }

    /// One value per block.
    public func perBlock(_ count: Int) -> [Int] {
        switch self {
        case .int(let i): return Array(repeating: i, count: count)
        case .list(let l): return l
        }
    }

    public var description: String {
        switch self {
        case .int(let i): return String(i)
        case .list(let l): return "[" + l.map(String.init).joined(separator: ", ") + "]"
        }
    }
}

/// `only_cross_attention`: one flag or one per block.
public enum BoolOrList: Codable, Sendable, Equatable, CustomStringConvertible {
    case bool(Bool)
    case list([Bool])

    public init(from decoder: Swift.Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let b = try? c.decode(Bool.self) { self = .bool(b); return }
        if let l = try? c.decode([Bool].self) { self = .list(l); return }
        throw DecodingError.typeMismatch(BoolOrList.self, .init(codingPath: decoder.codingPath,
                                                                debugDescription: "expected a boolean or a list of booleans"))
    }

    public func encode(to encoder: Swift.Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .bool(let b): try c.encode(b)
        case .list(let l): try c.encode(l)
        }
    }

    public var values: [Bool] {
        switch self {
        case .bool(let b): return [b]
        case .list(let l): return l
        }
    }

    public var description: String {
        switch self {
        case .bool(let b): return String(b)
        case .list(let l): return "[" + l.map(String.init).joined(separator: ", ") + "]"
        }
    }
}

extension KeyedDecodingContainer {
    /// The value, or `fallback` when the key is missing or null (diffusers treats both as the
    /// default for these keys).
    func value<T: Decodable>(_ key: Key, or fallback: T) throws -> T {
        try decodeIfPresent(T.self, forKey: key) ?? fallback
    }

    /// For keys where an explicit `null` means "none" but a missing key means the default
    /// (`mid_block_type`, `norm_num_groups`, `shift_factor`).
    func nullable<T: Decodable>(_ key: Key, missing fallback: T?) throws -> T? {
        guard contains(key) else { return fallback }
        if try decodeNil(forKey: key) { return nil }
        return try decode(T.self, forKey: key)
    }
}

/// Renders a config value as it reads in JSON, for error messages.
func json(_ s: String?) -> String { s.map { "\"\($0)\"" } ?? "null" }
func json(_ i: Int?) -> String { i.map(String.init) ?? "null" }

/// Activations by the names diffusers' `get_activation` accepts.
enum DiffusersActivation {
    static func unary(_ name: String) -> UnaryOp? {
        switch name.lowercased() {
        case "silu", "swish": return .silu
        case "gelu": return .gelu
        case "relu": return .relu
        default: return nil  // mish has no op in the IR
        }
    }
}

/// Activations by the names transformers' `ACT2FN` accepts.
enum TransformersActivation {
    static func unary(_ name: String) -> UnaryOp? {
        switch name.lowercased() {
        case "quick_gelu": return .quickGelu
        case "gelu": return .gelu
        case "gelu_new", "gelu_pytorch_tanh", "gelu_fast": return .geluTanh
        case "relu": return .relu
        case "silu", "swish": return .silu
        default: return nil
        }
    }
}


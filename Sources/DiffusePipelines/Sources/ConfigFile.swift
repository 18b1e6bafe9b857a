import DiffuseCore

/// A configuration file's bytes and where they came from (a path, or an embedded copy), so that
/// a model built from it can name the file in its errors.
public struct ConfigFile: Sendable, Equatable, CustomStringConvertible {
    public let bytes: [UInt8]
    /// The path, or `embedded <architecture>/<file>` for the copies built into the binary.
    public let origin: String

    public init(bytes: [UInt8], origin: String) {
        self.bytes = bytes
        self.origin = origin
    }

    public init(text: String, origin: String) {
        self.init(bytes: Array(text.utf8), origin: origin)
    }

    /// Reads a file; a missing or unreadable file is a `FileError` naming it.
    public init(path: String) throws {
        self.init(bytes: try Files.read(path), origin: path)
    }

    public var text: String { String(decoding: bytes, as: UTF8.self) }

    /// The parsed JSON; invalid JSON is a `FileError` naming the origin.
    public func json() throws -> JSON {
        do { return try JSON.parse(bytes) } catch let e as JSON.ParseError {
            throw FileError(origin, "invalid JSON: \(e)")
        }
    }

    /// The top-level JSON object; anything else is an error naming the file.
    func object() throws -> JSON {
        let value = try json()
        guard value.members != nil else { throw ModelSourceError.invalidConfig(file: origin, detail: "is not a JSON object") }
        return value
    }

    /// A copy with top-level keys set to new values (other keys keep their order), for the
    /// few settings a checkpoint or an option overrides (`prediction_type`, `latent_channels`).
    func setting(_ changes: [(String, JSON)], note: String) throws -> ConfigFile {
        var members = try object().members ?? []
        for (key, value) in changes {
            if let i = members.firstIndex(where: { $0.0 == key }) { members[i].1 = value } else { members.append((key, value)) }
        }
        return ConfigFile(text: JSON.object(members).serialized(pretty: true) + "\n", origin: "\(origin) (\(note))")
    }

    public var description: String { origin }
}

/// Reads values out of a config object; a value of the wrong kind is an error naming the file
/// and the key, and a missing key takes the caller's default (the library's default).
struct ConfigReader {
    let json: JSON
    let origin: String

    init(_ file: ConfigFile) throws {
        json = try file.object()
        origin = file.origin
    }

    func fail(_ key: String, _ expected: String) -> ModelSourceError {
        .invalidConfig(file: origin, detail: "\(key) = \(json[key].map { $0.description } ?? "missing") is not \(expected)")
    }

    func string(_ key: String) throws -> String? {
        guard let v = json[key], !v.isNull else { return nil }
        guard let s = v.string else { throw fail(key, "a string") }
        return s
    }

    func int(_ key: String, default fallback: Int) throws -> Int {
        guard let v = json[key], !v.isNull else { return fallback }
        guard let i = v.int else { throw fail(key, "an integer") }
        return i
    }

    func bool(_ key: String, default fallback: Bool) throws -> Bool {
        guard let v = json[key], !v.isNull else { return fallback }
        guard let b = v.bool else { throw fail(key, "true or false") }
        return b
    }

    func ints(_ key: String) throws -> [Int]? {
        guard let v = json[key], !v.isNull else { return nil }
        let ints = v.array?.compactMap(\.int)
        guard let ints, ints.count == v.array?.count else { throw fail(key, "a list of integers") }
        return ints
    }

    /// An integer for every block, or one list entry per block (`layers_per_block`).
    func perBlock(_ key: String, count: Int, default fallback: Int) throws -> [Int] {
        guard let v = json[key], !v.isNull else { return Array(repeating: fallback, count: count) }
        if let i = v.int { return Array(repeating: i, count: count) }
        guard let list = try ints(key), list.count == count else { throw fail(key, "an integer or a list of \(count) integers") }
        return list
    }

    func strings(_ key: String) throws -> [String]? {
        guard let v = json[key], !v.isNull else { return nil }
        let strings = v.array?.compactMap(\.string)
        guard let strings, strings.count == v.array?.count else { throw fail(key, "a list of strings") }
        return strings
    }

    /// `null` when the key is present and null, the default when it is absent (diffusers'
    /// `mid_block_type`: a missing key is the cross-attention mid block, null is none).
    func nullableString(_ key: String, missing fallback: String?) throws -> String? {
        guard let v = json[key] else { return fallback }
        if v.isNull { return nil }
        guard let s = v.string else { throw fail(key, "a string or null") }
        return s
    }
}

import DiffuseCore
import DiffuseTokenizer
import FoundationEssentials
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// One tokenizer golden of the reference: `golden/<variant>/<name>.safetensors`, its prompts, and
/// the tokenizer folder diffusers loaded (`models/<variant>/<name>`, or `models/<variant>` itself
/// when that is the tokenizer folder).
struct TokenizerGolden: CustomTestStringConvertible, Sendable {
    let variant: String
    let name: String
    let goldenFile: String
    let promptsFile: String
    let tokenizerFolder: String

    var testDescription: String { "\(variant)/\(name)" }

    /// Every tokenizer golden in the reference, found by walking `golden/`.
    static func all() throws -> [TokenizerGolden] {
        let golden = Fixtures.reference("golden")
        var found: [TokenizerGolden] = []
        for variant in try Files.list(golden) where Files.isDirectory(Files.join(golden, variant)) {
            let dir = Files.join(golden, variant)
            let prompts = Files.join(dir, "prompts.json")
            for file in try Files.list(dir) where file.hasPrefix("tokenizer") && file.hasSuffix(".safetensors") {
                let name = String(file.dropLast(".safetensors".count))
                let model = Fixtures.reference(Files.join("models", variant))
                let folder = Files.isDirectory(Files.join(model, name)) ? Files.join(model, name) : model
                found.append(TokenizerGolden(variant: variant, name: name, goldenFile: Files.join(dir, file),
                                             promptsFile: prompts, tokenizerFolder: folder))
            }
        }
        return found
    }

    /// The reference tokenizer folder with the smallest vocab.json, for tests that copy one.
    static func smallestFolder() throws -> String {
        let folders = try all().map(\.tokenizerFolder)
        let sizes = try folders.map { try MappedFile(path: Files.join($0, "vocab.json")).size }
        guard let smallest = zip(folders, sizes).min(by: { $0.1 < $1.1 }) else {
            throw FileError(Fixtures.reference("golden"), "holds no tokenizer goldens")
        }
        return smallest.0
    }

    func prompts() throws -> [String] {
        guard let list = try Files.readJSON(promptsFile)["prompts"]?.array else {
            throw FileError(promptsFile, "has no \"prompts\" list")
        }
        return list.map { $0.string ?? "" }
    }

    struct Expected {
        var inputIds: [[Int]]
        var attentionMask: [[Int]]
        var untruncatedIds: [[Int]]
        var length: Int
    }

    func expected(count: Int) throws -> Expected {
        let file = try SafeTensorsFile(path: goldenFile)
        func rows(_ name: String) throws -> [[Int]] {
            let t = try file.tensor(name)
            let values = t.toIntArray()
            let width = t.shape[1]
            return (0..<t.shape[0]).map { Array(values[($0 * width)..<(($0 + 1) * width)]) }
        }
        let ids = try rows("input_ids")
        return Expected(inputIds: ids, attentionMask: try rows("attention_mask"),
                        untruncatedIds: try (0..<count).map { try file.tensor("untruncated_ids_\($0)").toIntArray() },
                        length: ids.first?.count ?? 0)
    }
}

/// The warnings logged while `body` runs.
func capturingWarnings(_ body: () throws -> Void) rethrows -> [String] {
    let captured = Mutex<[String]>([])
    let previous = Log.warningHandler
    Log.warningHandler = { message in captured.withLock { $0.append(message) } }
    defer { Log.warningHandler = previous }
    try body()
    return captured.withLock { $0 }
}

/// A fresh scratch folder, removed when `body` returns.
func withScratchFolder(_ body: (String) throws -> Void) throws {
    let path = "/tmp/diffuse-tokenizer-test-\(getpid())-\(UInt64.random(in: 0..<UInt64.max))"
    try Files.createDirectory(path)
    defer { try? FileManager.default.removeItem(atPath: path) }
    try body(path)
}

/// Copies a tokenizer folder's files into `target`.
func copyTokenizerFiles(from folder: String, to target: String) throws {
    for file in try Files.list(folder) {
        try Files.write(try Files.read(Files.join(folder, file)), to: Files.join(target, file))
    }
}

/// The text with whitespace removed, lower-cased character by character (as the tokenizer does).
func squeezed(_ text: String) -> String {
    var out = ""
    for u in text.unicodeScalars where !u.properties.isWhitespace {
        out += u.properties.lowercaseMapping
    }
    return out
}

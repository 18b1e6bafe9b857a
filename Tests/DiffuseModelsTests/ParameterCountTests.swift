import DiffuseCore
import DiffuseGraph
import DiffuseModels
import Foundation
import Testing

/// The "Parameter counts" table of `configs/SOURCES.md`: per model folder, the count diffusers /
/// transformers report for each component built from its config.
struct ParameterCountTable {
    struct Row: CustomStringConvertible, Sendable {
        let folder: String
        let component: String
        let count: Int
        var description: String { "\(folder)/\(component)" }
    }

    static func load() throws -> (rows: [Row], standalone: [Row]) {
        let text = try Files.readText(Fixtures.data("configs/SOURCES.md"))
        guard let section = text.components(separatedBy: "## Parameter counts").dropFirst().first else {
            throw FileError(Fixtures.data("configs/SOURCES.md"), "no \"## Parameter counts\" section")
        }
        let lines = section.components(separatedBy: "\n")
        func cells(_ line: String) -> [String] {
            line.split(separator: "|", omittingEmptySubsequences: false).dropFirst().dropLast()
                .map { $0.trimmingCharacters(in: .whitespaces) }
        }
        func number(_ s: String) -> Int? { Int(s.replacingOccurrences(of: ",", with: "")) }
        var rows: [Row] = []
        var header: [String] = []
        for line in lines where line.hasPrefix("|") {
            let c = cells(line)
            if header.isEmpty { header = c; continue }
            if c.allSatisfy({ $0.allSatisfy { "-: ".contains($0) } }) { continue }  // |---|---:|
            for (name, value) in zip(header.dropFirst(), c.dropFirst()) {
                if let n = number(value) { rows.append(Row(folder: c[0], component: name, count: n)) }
            }
        }
        // Standalone lines: "taesd (AutoencoderTiny): 2,445,063 parameters."
        var standalone: [Row] = []
        for line in lines {
            let parts = line.components(separatedBy: ": ")
            guard parts.count == 2, parts[1].hasSuffix(" parameters."), let open = parts[0].firstIndex(of: "(") else { continue }
            let folder = parts[0][..<open].trimmingCharacters(in: .whitespaces)
            let cls = parts[0][parts[0].index(after: open)...].dropLast()
            if let n = number(String(parts[1].dropLast(" parameters.".count))) {
                standalone.append(Row(folder: folder, component: String(cls), count: n))
            }
        }
        return (rows, standalone)
    }
}

/// Builds the model a config describes, by its component folder name and the file's class.
func model(component: String, configPath: String) throws -> any ModelComponent {
    if component.hasPrefix("text_encoder") {
        let config = try loadConfiguration(CLIPTextConfig.self, from: configPath)
        return config.architectures?.contains("CLIPTextModelWithProjection") == true
            ? try CLIPTextModelWithProjection(config: config) : try CLIPTextModel(config: config)
    }
    switch component {
    case "unet", "UNet2DConditionModel": return try UNet2DConditionModel(configPath: configPath)
    case "vae", "AutoencoderKL": return try AutoencoderKL(configPath: configPath)
    case "AutoencoderTiny": return try AutoencoderTiny(configPath: configPath)
    default: throw FileError(configPath, "no model for component \(component)")
    }
}

@Suite struct ParameterCountTests {
    @Test func tableIsRead() throws {
        let (rows, standalone) = try ParameterCountTable.load()
        #expect(rows.count >= 8, "parsed rows: \(rows)")
        #expect(!standalone.isEmpty)
        #expect(Set(rows.map(\.component)).isSuperset(of: ["unet", "vae", "text_encoder"]))
    }

    /// Every real config's architecture has exactly diffusers' / transformers' parameter count.
    @Test(arguments: (try? ParameterCountTable.load().rows) ?? [])
    func realConfig(_ row: ParameterCountTable.Row) throws {
        let m = try model(component: row.component, configPath: Fixtures.data("configs/\(row.folder)/\(row.component)/config.json"))
        #expect(m.parameterCount == row.count, "\(row): \(m.parameterCount) declared, diffusers has \(row.count)")
        // Names are unique, so a state dict maps one to one.
        #expect(Set(m.parameters.map(\.name)).count == m.parameters.count)
    }

    @Test func standaloneConfigs() throws {
        for row in try ParameterCountTable.load().standalone {
            let m = try model(component: row.component, configPath: Fixtures.data("configs/\(row.folder)/config.json"))
            #expect(m.parameterCount == row.count, "\(row.folder): \(m.parameterCount) declared, diffusers has \(row.count)")
        }
    }

    /// Random weights of a real architecture pass the weight check and bind to a graph.
    @Test func randomWeightsOfRealArchitecture() throws {
        let (rows, _) = try ParameterCountTable.load()
        let row = try #require(rows.first { $0.component == "unet" })
        let unet = try UNet2DConditionModel(configPath: Fixtures.data("configs/\(row.folder)/unet/config.json"))
        let weights = unet.randomWeights(seed: 1)
        #expect(try unet.checkWeights(weights).isEmpty)
        let graph = try unet.graph(batch: 2, height: 8, width: 8, sequenceLength: 77)
        try ModelWeights(weights).validate(graph)
        #expect(graph.parameters.count == unet.parameters.count)
    }
}

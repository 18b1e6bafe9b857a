import DiffuseCore
import Testing
@testable import DiffuseSchedulers

/// torch's CPU randn, checked bit for bit against `golden/rng/randn.safetensors`.
struct RandomTests {
    static let path = Fixtures.reference("golden/rng/randn.safetensors")

    /// A golden name: `randn_seed{S}_{shape}` (a fresh generator) or `seq_seed{S}_{step}_{shape}`
    /// (consecutive draws from one generator, in `step` order).
    struct Case {
        let name: String
        let seed: UInt64
        let sequence: String?
        let shape: [Int]

        init?(_ name: String) {
            let parts = name.split(separator: "_").map(String.init)
            guard parts.count >= 3, parts[1].hasPrefix("seed"), let seed = UInt64(parts[1].dropFirst(4)) else { return nil }
            let shape = parts.last!.split(separator: "x").compactMap { Int($0) }
            switch parts[0] {
            case "randn" where parts.count == 3: sequence = nil
            case "seq" where parts.count == 4: sequence = parts[2]
            default: return nil
            }
            self.name = name
            self.seed = seed
            self.shape = shape
        }
    }

    static func cases() throws -> (SafeTensorsFile, [Case]) {
        let file = try SafeTensorsFile(path: path)
        return (file, file.tensorNames.compactMap(Case.init))
    }

    static func expectBitExact(_ got: Tensor, _ want: Tensor, _ name: String) {
        #expect(got.shape == want.shape, "\(name): shape \(got.shape) != \(want.shape)")
        guard got.shape == want.shape else { return }
        let g = got.pointer(as: UInt32.self), w = want.pointer(as: UInt32.self)
        var mismatches = 0
        var first = -1
        for i in 0..<want.count where g[i] != w[i] {
            if first < 0 { first = i }
            mismatches += 1
        }
        #expect(mismatches == 0, "\(name): \(mismatches) of \(want.count) values differ; first at \(first): \(first >= 0 ? "\(got.floats[first]) vs \(want.floats[first])" : "")")
    }

    @Test func everyGoldenNameIsUnderstood() throws {
        let (file, cases) = try Self.cases()
        #expect(!cases.isEmpty)
        #expect(cases.count == file.tensorNames.count, "unrecognized names: \(Set(file.tensorNames).subtracting(cases.map(\.name)))")
        for c in cases { #expect(c.shape == file.info(c.name)?.shape, "\(c.name): shape in the name differs from the tensor") }
    }

    @Test func freshGeneratorsMatchTorch() throws {
        let (file, cases) = try Self.cases()
        for c in cases where c.sequence == nil {
            let got = TorchCPUGenerator(seed: c.seed).randn(c.shape)
            Self.expectBitExact(got, try file.tensor(c.name), c.name)
        }
    }

    @Test func consecutiveDrawsContinueTheStream() throws {
        let (file, cases) = try Self.cases()
        let sequences = Dictionary(grouping: cases.filter { $0.sequence != nil }, by: \.seed)
        #expect(!sequences.isEmpty)
        for (seed, steps) in sequences {
            let generator = TorchCPUGenerator(seed: seed)
            for c in steps.sorted(by: { $0.sequence! < $1.sequence! }) {
                Self.expectBitExact(generator.randn(c.shape), try file.tensor(c.name), c.name)
            }
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import Testing
@testable import DiffuseSchedulers

/// The parts of DPMSolverSDEScheduler's noise, each against what torch, numpy and torchsde give
/// (`Fixtures/random_math.safetensors`, written by scripts/fixtures/make_scheduler_reference.py;
/// `DIFFUSE_SCHEDULER_FIXTURES` points at another schedulers folder, whose parent holds it).
/// The scheduler goldens (`dpmpp_sde*`) check them together.
struct BrownianTreeTests {
    static let file: SafeTensorsFile? = {
        let schedulers = SchedulerGoldenTests.directories[1]
        let path = Files.join(String(schedulers[..<(schedulers.lastIndex(of: "/") ?? schedulers.endIndex)]), "random_math.safetensors")
        return try? SafeTensorsFile(path: path)
    }()

    static func goldens() throws -> SafeTensorsFile { try #require(file, "no random_math.safetensors beside the scheduler goldens") }

    static func int64s(_ t: Tensor) -> [Int64] {
        let p = t.pointer(as: Int64.self)
        return (0..<t.count).map { p[$0] }
    }

    /// torch's float32 exp and log (MKL's on x86) are not glibc's to the bit, but within an ulp:
    /// the scheduler's Brownian query times are then at most an ulp from diffusers'.
    @Test func glibcLogAndExpAreWithinAnUlpOfTorch() throws {
        let file = try Self.goldens()
        for (name, f) in [("log", { logf($0) }), ("exp", { expf($0) })] as [(String, (Float) -> Float)] {
            let input = try file.tensor("\(name)_input").toFloatArray(), want = try file.tensor(name).toFloatArray()
            let far = zip(input, want).filter { abs(f($0.0) - $0.1) > $0.1.ulp }
            #expect(far.isEmpty, "\(name): \(far.count) of \(input.count) more than an ulp from torch's, e.g. \(name)(\(far.first?.0 ?? 0))")
        }
    }

    @Test func seedSequenceStatesMatchNumPy() throws {
        let file = try Self.goldens()
        let entropies = Self.int64s(try file.tensor("seed_sequence_entropy"))
        let keys = Self.int64s(try file.tensor("seed_sequence_spawn_key"))
        let states = Self.int64s(try file.tensor("seed_sequence_state"))
        for (i, entropy) in entropies.enumerated() {
            let key = keys[2 * i] < 0 ? [] : [UInt64(keys[2 * i]), UInt64(keys[2 * i + 1])]
            let got = NumPySeedSequence(entropy: UInt64(entropy), spawnKey: key, poolSize: 24).generateState(4).map(Int64.init)
            #expect(got == Array(states[4 * i ..< 4 * i + 4]), "SeedSequence(\(entropy), spawn_key=\(key))")
        }
    }

    @Test func defaultGeneratorSeedIsTorchRandint() throws {
        let file = try Self.goldens()
        let shape = try file.tensor("default_seed_randn_shape").toIntArray()
        let seeds = Self.int64s(try file.tensor("default_seed_seeds")), want = Self.int64s(try file.tensor("default_seed"))
        for (seed, value) in zip(seeds, want) {
            let generator = TorchCPUGenerator(seed: UInt64(seed))
            _ = generator.randn(shape)
            #expect(generator.defaultGeneratorSeed() == UInt64(value), "torch.manual_seed(\(seed)), randn, randint")
        }
    }

    @Test func brownianIncrementsMatchTorchsde() throws {
        let file = try Self.goldens()
        let range = try file.tensor("brownian_range"), shape = try file.tensor("brownian_shape").toIntArray()
        let queries = try file.tensor("brownian_queries")
        for entropy in Self.int64s(try file.tensor("brownian_entropies")) {
            let want = try file.tensor("brownian_\(entropy)")
            let tree = try BrownianTree(t0: range.element(0), t1: range.element(1), shape: shape, entropy: UInt64(entropy))
            for q in 0..<queries.shape[0] {
                let got = try tree.increment(from: queries.element(2 * q), to: queries.element(2 * q + 1))
                let expected = row(want, q)
                let same = (0..<got.count).allSatisfy { got.floats[$0].bitPattern == expected.floats[$0].bitPattern }
                #expect(same, "entropy \(entropy), W(\(queries.element(2 * q + 1))) − W(\(queries.element(2 * q))): max error \(maxErrors(got, expected).error)")
            }
        }
    }

    /// The path is the same whatever order it is asked in (torchsde's halfway tree), so a second
    /// tree asked the queries backwards gives the same increments.
    @Test func incrementsDoNotDependOnQueryOrder() throws {
        let file = try Self.goldens()
        let range = try file.tensor("brownian_range"), shape = try file.tensor("brownian_shape").toIntArray()
        let queries = try file.tensor("brownian_queries")
        let forward = try BrownianTree(t0: range.element(0), t1: range.element(1), shape: shape, entropy: 7)
        let backward = try BrownianTree(t0: range.element(0), t1: range.element(1), shape: shape, entropy: 7)
        let n = queries.shape[0]
        let a = try (0..<n).map { try forward.increment(from: queries.element(2 * $0), to: queries.element(2 * $0 + 1)) }
        let b = try (0..<n).reversed().map { try backward.increment(from: queries.element(2 * $0), to: queries.element(2 * $0 + 1)) }
        for (x, y) in zip(a, b.reversed()) { #expect(maxErrors(x, y).error == 0) }
    }
}

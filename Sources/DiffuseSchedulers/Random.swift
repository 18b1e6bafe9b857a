#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import DiffuseGraph

/// A stream of standard-normal samples, as a seeded `torch.Generator` gives them.
public protocol RandomSource: AnyObject {
    /// `torch.randn(shape, generator=self)` as float32; each call continues the stream.
    /// Throws only where the numbers come from a device that fails.
    func randn(_ shape: [Int]) throws -> Tensor
    /// A fresh generator of this kind on the same device: `torch.Generator(device).manual_seed(seed)`
    /// (torchsde seeds one per node of its Brownian tree).
    func reseeded(_ seed: UInt64) -> RandomSource
    /// `torch.randint(0, 2**63 - 1, []).item()` from torch's default CPU generator, the draw
    /// diffusers' `DPMSolverSDEScheduler` makes for its noise sampler when its config sets no
    /// `noise_sampler_seed`. A CPU generator is taken to be that default one
    /// (`generator=torch.manual_seed(seed)`) and continues its stream.
    func defaultGeneratorSeed() throws -> UInt64
}

/// diffusers' `randn_tensor`: one generator draws the whole shape; a list of generators (one
/// per batch entry) draws each entry of the first axis from its own generator.
public func randnTensor(_ shape: [Int], generators: [RandomSource]) throws -> Tensor {
    guard let first = generators.first else { throw RandomError.noGenerator }
    if generators.count == 1 { return try first.randn(shape) }
    guard let batch = shape.first, batch == generators.count else {
        throw RandomError.generatorCount(generators: generators.count, shape: shape)
    }
    let rowShape = [1] + shape.dropFirst()
    return concatenate(try generators.map { try $0.randn(rowShape) }, axis: 0)
}

public enum RandomError: Error, CustomStringConvertible, Equatable {
    case noGenerator
    case generatorCount(generators: Int, shape: [Int])

    public var description: String {
        switch self {
        case .noGenerator: return "randn_tensor needs at least one generator"
        case let .generatorCount(n, shape):
            return "\(n) generators were given for shape \(shape); a list of generators needs one per batch entry"
        }
    }
}

// MARK: - Mersenne Twister

/// PyTorch's `at::mt19937`: the reference MT19937 with a 64-bit seed truncated to 32 bits.
struct MT19937 {
    private static let n = 624, m = 397
    private var state = [UInt32](repeating: 0, count: MT19937.n)
    private var left = 1
    private var next = 0

    init(seed: UInt64) {
        state[0] = UInt32(truncatingIfNeeded: seed)
        for j in 1..<Self.n {
            let prev = state[j - 1]
            state[j] = 1_812_433_253 &* (prev ^ (prev >> 30)) &+ UInt32(j)
        }
    }

    mutating func nextUInt32() -> UInt32 {
        left -= 1
        if left == 0 { twist() }
        var y = state[next]
        next += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C_5680
        y ^= (y << 15) & 0xEFC6_0000
        y ^= y >> 18
        return y
    }

    private mutating func twist() {
        left = Self.n
        next = 0
        state.withUnsafeMutableBufferPointer { s in
            @inline(__always) func mix(_ u: UInt32, _ v: UInt32) -> UInt32 {
                let bits = (u & 0x8000_0000) | (v & 0x7FFF_FFFF)
                return (bits >> 1) ^ (v & 1 != 0 ? 0x9908_B0DF : 0)
            }
            for j in 0..<(Self.n - 1) {
                s[j] = s[(j + Self.m) % Self.n] ^ mix(s[j], s[j + 1])
            }
            s[Self.n - 1] = s[Self.m - 1] ^ mix(s[Self.n - 1], s[0])
        }
    }
}

// MARK: - torch.Generator("cpu")

/// `torch.Generator("cpu").manual_seed(seed)`: `randn` reproduces `torch.randn(shape, generator=g)`
/// on an x86-64 machine with AVX2 bit for bit, and consecutive calls continue the stream.
///
/// PyTorch draws normals two ways (`normal_kernel` in ATen's cpu/DistributionTemplates.h):
/// - fewer than 16 elements: one Box-Muller pair per two elements in double precision, from two
///   53-bit uniforms, with the second value of a pair cached in the generator for the next draw;
/// - 16 or more: the whole buffer is first filled with 24-bit float uniforms, then each block of
///   16 becomes 8 Box-Muller pairs (j, j+8) through the 8-wide AVX2 Cephes `log256_ps` /
///   `sincos256_ps`. A partial last block redraws 16 fresh uniforms over the last 16 slots.
public final class TorchCPUGenerator: RandomSource {
    private var engine: MT19937
    private var nextDoubleNormal: Double?
    /// The seed of the last `manualSeed` (torch's `initial_seed()`).
    public private(set) var initialSeed: UInt64

    public init(seed: UInt64) {
        engine = MT19937(seed: seed)
        initialSeed = seed
    }

    /// Reseeds: a fresh engine and no cached normal sample, as `manual_seed` does.
    public func manualSeed(_ seed: UInt64) {
        engine = MT19937(seed: seed)
        nextDoubleNormal = nil
        initialSeed = seed
    }

    /// One 32-bit draw (torch's `random()`).
    public func random() -> UInt32 { engine.nextUInt32() }

    /// Two 32-bit draws, the first as the high half (torch's `random64()`).
    public func random64() -> UInt64 {
        let hi = UInt64(engine.nextUInt32())
        return hi << 32 | UInt64(engine.nextUInt32())
    }

    public func reseeded(_ seed: UInt64) -> RandomSource { TorchCPUGenerator(seed: seed) }

    /// `torch.randint(0, 2**63 - 1, [], generator=self)`: a range of 2³² or more takes one
    /// `random64()` modulo the range.
    public func defaultGeneratorSeed() -> UInt64 { random64() % ((1 << 63) - 1) }

    public func randn(_ shape: [Int]) -> Tensor {
        let out = Tensor(zeros: shape, dtype: .float32)
        let count = out.count
        let data = out.floats
        if count >= 16 {
            normalFill(data, count: count)
        } else {
            for i in 0..<count { data[i] = Float(nextNormalDouble()) }
        }
        return out
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled to [0, 1).
    @inline(__always) private func uniformFloat() -> Float {
        Float(engine.nextUInt32() & 0xFF_FFFF) * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits scaled to [0, 1).
    @inline(__always) private func uniformDouble() -> Double {
        Double(random64() & 0x1F_FFFF_FFFF_FFFF) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `normal_distribution<double>` with its cached second sample.
    private func nextNormalDouble() -> Double {
        if let cached = nextDoubleNormal {
            nextDoubleNormal = nil
            return cached
        }
        let u1 = uniformDouble()
        let u2 = uniformDouble()
        let r = (-2.0 * log1p(-u2)).squareRoot()
        let theta = 2.0 * Double.pi * u1
        nextDoubleNormal = r * sin(theta)
        return r * cos(theta)
    }

    private func normalFill(_ data: UnsafeMutablePointer<Float>, count: Int) {
        for i in 0..<count { data[i] = uniformFloat() }
        var i = 0
        while i + 16 <= count {
            TorchCPUGenerator.boxMuller16(data + i)
            i += 16
        }
        if count % 16 != 0 {
            let tail = data + count - 16
            for j in 0..<16 { tail[j] = uniformFloat() }
            TorchCPUGenerator.boxMuller16(tail)
        }
    }

    /// `normal_fill_16_AVX2` lane by lane: uniforms (u[j], u[j+8]) become normals in place.
    @inline(__always) static func boxMuller16(_ d: UnsafeMutablePointer<Float>) {
        let twoPi = Float(2.0 * Double.pi)
        for j in 0..<8 {
            let u1: Float = 1 - d[j]  // [0, 1) -> (0, 1] for the log
            let u2 = d[j + 8]
            let radius = (-2 * CephesFloat.log(u1)).squareRoot()
            let (s, c) = CephesFloat.sincos(twoPi * u2)
            // The kernel ends with fmadd(n, std=1, mean=0), which turns -0 into +0.
            d[j] = radius * c + 0
            d[j + 8] = radius * s + 0
        }
    }
}

/// One lane of PyTorch's `avx_mathfun.h` (Cephes-derived float polynomials), with the fused
/// multiply-adds that GCC forms from its mul/add intrinsics (`-ffp-contract=fast`): each
/// product whose only use is an add is fused, the first in statement order when both operands
/// of an add are products. The last bits of `torch.randn` depend on every one of these.
enum CephesFloat {
    /// A C `float` constant written as a double literal: rounded decimal → double → float.
    @inline(__always) private static func c(_ value: Double) -> Float { Float(value) }

    static func log(_ input: Float) -> Float {
        var x = max(input, Float(bitPattern: 0x0080_0000))  // cut off denormals
        let exponent = Int32(bitPattern: x.bitPattern >> 23) - 0x7F
        x = Float(bitPattern: (x.bitPattern & ~0x7F80_0000) | Float(0.5).bitPattern)  // mantissa in [0.5, 1)
        var e = Float(exponent) + 1
        let small = x < c(0.707106781186547524)
        let tmp: Float = small ? x : 0
        x = x - 1
        e = e - (small ? 1 : 0)
        x = x + tmp
        let z = x * x
        var y = c(7.0376836292E-2)
        y = c(-1.1514610310E-1).addingProduct(y, x)
        y = c(1.1676998740E-1).addingProduct(y, x)
        y = c(-1.2420140846E-1).addingProduct(y, x)
        y = c(1.4249322787E-1).addingProduct(y, x)
        y = c(-1.6668057665E-1).addingProduct(y, x)
        y = c(2.0000714765E-1).addingProduct(y, x)
        y = c(-2.4999993993E-1).addingProduct(y, x)
        y = c(3.3333331174E-1).addingProduct(y, x)
        y = y * x
        y = (e * c(-2.12194440e-4)).addingProduct(y, z)
        y = y - z * 0.5
        x = x + y
        x = x.addingProduct(e, c(0.693359375))
        return input <= 0 ? .nan : x
    }

    static func sincos(_ input: Float) -> (sin: Float, cos: Float) {
        var signSin = input.bitPattern & 0x8000_0000
        var x = Swift.abs(input)
        var j = Int32(x * c(1.27323954473516))  // scale by 4/π, truncate
        j = (j &+ 1) & ~1
        let y = Float(j)
        signSin ^= UInt32(bitPattern: (j & 4) << 29)
        let sinPolyFirst = (j & 2) == 0
        let signCos = UInt32(bitPattern: (~(j &- 2) & 4) << 29)
        // Extended-precision reduction x - y·π/4 in three parts.
        x = x.addingProduct(y, c(-0.78515625))
        x = x.addingProduct(y, c(-2.4187564849853515625e-4))
        x = x.addingProduct(y, c(-3.77489497744594108e-8))
        let z = x * x
        var cosPoly = c(2.443315711809948E-005)
        cosPoly = c(-1.388731625493765E-003).addingProduct(cosPoly, z)
        cosPoly = c(4.166664568298827E-002).addingProduct(cosPoly, z)
        cosPoly = cosPoly * z
        cosPoly = (-(z * 0.5)).addingProduct(cosPoly, z)
        cosPoly = cosPoly + 1
        var sinPoly = c(-1.9515295891E-4)
        sinPoly = c(8.3321608736E-3).addingProduct(sinPoly, z)
        sinPoly = c(-1.6666654611E-1).addingProduct(sinPoly, z)
        sinPoly = sinPoly * z
        sinPoly = x.addingProduct(sinPoly, x)
        let (sinValue, cosValue) = sinPolyFirst ? (sinPoly, cosPoly) : (cosPoly, sinPoly)
        return (Float(bitPattern: sinValue.bitPattern ^ signSin), Float(bitPattern: cosValue.bitPattern ^ signCos))
    }
}

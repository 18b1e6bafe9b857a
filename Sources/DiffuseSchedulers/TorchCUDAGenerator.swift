#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import DiffuseGraph

/// `torch.Generator("cuda").manual_seed(seed)`: `randn(shape)` reproduces
/// `torch.randn(shape, generator=g, device="cuda")`, so seeds of diffusers scripts that draw on
/// the GPU give the same initial latents.
///
/// PyTorch's CUDA `normal_` (ATen cuda/DistributionTemplates.h) launches a grid-stride kernel of
/// 256-thread blocks, at most `multiprocessorCount · (maxThreadsPerMultiprocessor / 256)` blocks.
/// Thread `idx` runs cuRAND's Philox4x32-10 with subsequence `idx` and the generator's offset,
/// and each `curand_normal4` call (four 32-bit draws, two Box-Muller pairs) fills elements
/// `idx + k·threads` for k = 0...3 of its stretch of `4·threads`. After the call the offset grows
/// by 4 per `curand_normal4` a thread made. The element layout therefore depends on the
/// device's multiprocessor count (132 on an H100 SXM).
///
/// With a `device` the kernel runs on that GPU with cuRAND's own float expressions and
/// intrinsics: bit-exact. Without one it is emulated on the host: the integer stream (Philox,
/// counters, offsets, element order) is exact, but the Box-Muller uses the GPU's `__sincosf`
/// hardware approximation, which the host computes accurately instead (after `__sincosf`'s
/// round-toward-zero scaling by 1/2π). Checked against torch 2.11 on an H100: every emulated
/// value within 1.5e-6 of the GPU's, about a quarter of them bit-identical, and the same
/// generator offsets after each call.
public final class TorchCUDAGenerator: RandomSource {
    public let seed: UInt64
    /// Philox offset per thread (torch's `philox_offset_per_thread`): where the next draw starts.
    public private(set) var offset: UInt64 = 0
    public let multiprocessorCount: Int
    public let maxThreadsPerMultiprocessor: Int
    /// The GPU that draws; nil: the host emulation.
    public let device: TorchCUDANormalDevice?

    private static let blockSize = 256
    private static let unroll = 4  // a float4 per curand_normal4

    /// - multiprocessorCount: the device's SM count (132 on an H100 SXM, 108 on an A100, 128 on an RTX 4090).
    /// - maxThreadsPerMultiprocessor: 2048 on data-centre GPUs (sm_80, sm_90), 1536 on sm_86/sm_89.
    public init(seed: UInt64, multiprocessorCount: Int = 132, maxThreadsPerMultiprocessor: Int = 2048) {
        self.seed = seed
        self.multiprocessorCount = max(1, multiprocessorCount)
        self.maxThreadsPerMultiprocessor = max(Self.blockSize, maxThreadsPerMultiprocessor)
        device = nil
    }

    /// Draws on `device` with its own multiprocessor counts.
    public init(seed: UInt64, device: TorchCUDANormalDevice) {
        self.seed = seed
        multiprocessorCount = max(1, device.multiprocessorCount)
        maxThreadsPerMultiprocessor = max(Self.blockSize, device.maxThreadsPerMultiprocessor)
        self.device = device
    }

    public func reseeded(_ seed: UInt64) -> RandomSource {
        if let device { return TorchCUDAGenerator(seed: seed, device: device) }
        return TorchCUDAGenerator(seed: seed, multiprocessorCount: multiprocessorCount, maxThreadsPerMultiprocessor: maxThreadsPerMultiprocessor)
    }

    /// A script drawing on the GPU leaves torch's default CPU generator to `torch.manual_seed`:
    /// taken here as seeded with this generator's seed and not drawn from before.
    public func defaultGeneratorSeed() -> UInt64 { TorchCPUGenerator(seed: seed).defaultGeneratorSeed() }

    /// Whether the values are torch's bit for bit (drawn on a GPU) or emulated.
    public var isBitExact: Bool { device != nil }

    public func randn(_ shape: [Int]) throws -> Tensor {
        let numel = shape.reduce(1, *)
        guard numel > 0 else { return Tensor(zeros: shape, dtype: .float32) }
        precondition(numel <= Int(Int32.max), "TorchCUDAGenerator: tensors over 2^31 elements are split by torch; not emulated")
        // calc_execution_policy
        let blocksPerSM = maxThreadsPerMultiprocessor / Self.blockSize
        let grid = min((numel + Self.blockSize - 1) / Self.blockSize, multiprocessorCount * blocksPerSM)
        let threads = grid * Self.blockSize
        let stride = threads * Self.unroll
        let calls = (numel - 1) / stride + 1
        let base = offset
        offset += UInt64(calls * 4)  // curand_normal4 consumes 4 offsets; always a multiple of 4
        if let device {
            return try device.torchNormal(count: numel, seed: seed, offset: base, threads: threads).reshaped(shape)
        }

        let out = Tensor(zeros: shape, dtype: .float32)
        let key = (UInt32(truncatingIfNeeded: seed), UInt32(truncatingIfNeeded: seed >> 32))
        let data = out.floats
        Parallel.chunks(threads, grain: 64) { range in
            for idx in range {
                for k in 0..<calls {
                    // curand_init(seed, subsequence: idx, offset: base) then k curand4 calls.
                    let counter = base / 4 + UInt64(k)
                    let bits = Philox4x32.block(counter: (UInt32(truncatingIfNeeded: counter), UInt32(truncatingIfNeeded: counter >> 32),
                                                          UInt32(truncatingIfNeeded: idx), UInt32(truncatingIfNeeded: UInt64(idx) >> 32)),
                                                key: key)
                    let (n0, n1) = Self.boxMuller(bits.0, bits.1)
                    let (n2, n3) = Self.boxMuller(bits.2, bits.3)
                    let first = k * stride + idx
                    // normal() stores rand·1 + 0 (so -0 becomes +0).
                    for (ii, value) in [n0, n1, n2, n3].enumerated() where first + ii * threads < numel {
                        data[first + ii * threads] = value + 0
                    }
                }
            }
        }
        return out
    }

    /// cuRAND's `_curand_box_muller`: (sin v·s, cos v·s) with s = √(-2 ln u).
    static func boxMuller(_ x: UInt32, _ y: UInt32) -> (Float, Float) {
        let inv32: Float = 0x1p-32
        let inv32TwoPi: Float = 2.3283064e-10 * 6.2831855  // CURAND_2POW32_INV_2PI, folded in float
        let u = Float(x) * inv32 + inv32 / 2
        let v = (inv32TwoPi / 2).addingProduct(Float(y), inv32TwoPi)
        let s = (-2 * Float(log(Double(u)))).squareRoot()
        // __sincosf scales by 1/2π rounding toward zero, then evaluates sin/cos of 2π·t.
        let t = roundTowardZero(Double(v) * Double(Float(1 / (2 * Double.pi))))
        let angle = 2 * Double.pi * Double(t)
        return (Float(sin(angle)) * s, Float(cos(angle)) * s)
    }

    /// The float nearest to a positive `x` that is not larger (the product of two floats is exact in double).
    private static func roundTowardZero(_ x: Double) -> Float {
        var f = Float(x)
        if Double(f) > x { f = f.nextDown }
        return f
    }
}

/// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3"), as cuRAND runs it.
enum Philox4x32 {
    static func block(counter c: (UInt32, UInt32, UInt32, UInt32), key k: (UInt32, UInt32)) -> (UInt32, UInt32, UInt32, UInt32) {
        var c = c, k = k
        for round in 0..<10 {
            if round > 0 {
                k.0 &+= 0x9E37_79B9
                k.1 &+= 0xBB67_AE85
            }
            let p0 = UInt64(0xD251_1F53) * UInt64(c.0)
            let p1 = UInt64(0xCD9E_8D57) * UInt64(c.2)
            c = (UInt32(truncatingIfNeeded: p1 >> 32) ^ c.1 ^ k.0, UInt32(truncatingIfNeeded: p1),
                 UInt32(truncatingIfNeeded: p0 >> 32) ^ c.3 ^ k.1, UInt32(truncatingIfNeeded: p0))
        }
        return c
    }
}

import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// 64-byte aligned host memory, owned or borrowed (for example from a memory-mapped file).
public final class TensorStorage: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let byteCount: Int
    /// Keeps a borrowed region alive (e.g. the mapped file) for as long as any tensor uses it.
    private let owner: AnyObject?
    private let mapping: PageAllocator.Region?

    /// Fresh zeroed memory.
    public init(byteCount: Int) {
        self.byteCount = byteCount
        owner = nil
        if let (base, region) = PageAllocator.allocate(byteCount) {
            self.base = base
            mapping = region
        } else {
            base = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: 64)
            base.initializeMemory(as: UInt8.self, repeating: 0, count: max(byteCount, 1))
            mapping = nil
        }
    }

    /// Memory that belongs to `owner`; nothing is copied.
    public init(borrowing base: UnsafeMutableRawPointer, byteCount: Int, owner: AnyObject) {
        self.base = base
        self.byteCount = byteCount
        self.owner = owner
        mapping = nil
    }

    deinit {
        guard owner == nil else { return }
        if let mapping { PageAllocator.free(mapping) } else { base.deallocate() }
    }
}

/// Large buffers (weights, arenas, big outputs) come straight from the kernel rather than from
/// malloc: glibc raises its mmap threshold after each large free, so freed weights stayed in
/// its heap and in RSS, and releasing a component after use freed nothing. Freed regions up to
/// 16 MiB are kept in a small cache (64 MiB in all) and zeroed on reuse, so that a buffer made
/// and dropped on every run (a graph's output) does not pay a page fault per 4 KiB each time:
/// that cost a 4096x320x320 matmul 10-15%.
enum PageAllocator {
    struct Region: @unchecked Sendable {
        let start: UnsafeMutableRawPointer
        let length: Int
    }

    static let threshold = 1 << 20
    static let hugePage = 2 << 20
    static let cacheable = 16 << 20
    static let cacheLimit = 64 << 20
    private static let cache = Mutex<(regions: [Region], bytes: Int)>(([], 0))

    /// Zeroed memory of `byteCount` bytes and the region to free, or nil below the threshold.
    static func allocate(_ byteCount: Int) -> (UnsafeMutableRawPointer, Region)? {
        guard byteCount >= threshold else { return nil }
        // Big buffers start on a 2 MiB boundary and ask for transparent huge pages: 512x fewer
        // page faults when weights are prepared again after a release, and fewer TLB misses.
        let huge = byteCount >= 4 * hugePage
        let length = byteCount + (huge ? hugePage : 0)
        func place(_ r: Region) -> UnsafeMutableRawPointer {
            let start = Int(bitPattern: r.start)
            return UnsafeMutableRawPointer(bitPattern: huge ? (start + hugePage - 1) & ~(hugePage - 1) : start)!
        }
        let reused: Region? = length > cacheable ? nil : cache.withLock { c in
            guard let i = c.regions.firstIndex(where: { $0.length >= length && $0.length <= 2 * length }) else { return nil }
            c.bytes -= c.regions[i].length
            return c.regions.remove(at: i)
        }
        if let r = reused {
            let base = place(r)
            memset(base, 0, byteCount)
            return (base, r)
        }
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
            return nil
        }
        let r = Region(start: p, length: length)
        let base = place(r)
        if huge { _ = madvise(base, byteCount, MADV_HUGEPAGE) }
        return (base, r)
    }

    static func free(_ r: Region) {
        let kept = r.length <= cacheable && cache.withLock { c in
            guard c.bytes + r.length <= cacheLimit else { return false }
            c.regions.append(r)
            c.bytes += r.length
            return true
        }
        if !kept { munmap(r.start, r.length) }
    }
}

/// A dense, row-major host tensor. Copies share storage, as torch tensors do; `copy()` makes
/// an independent one.
public struct Tensor: @unchecked Sendable, CustomStringConvertible {
    public let dtype: DType
    public let shape: [Int]
    public let storage: TensorStorage
    public let byteOffset: Int

    public init(dtype: DType, shape: [Int], storage: TensorStorage, byteOffset: Int = 0) {
        precondition(byteOffset + shape.reduce(1, *) * dtype.size <= storage.byteCount, "tensor exceeds its storage")
        self.dtype = dtype
        self.shape = shape
        self.storage = storage
        self.byteOffset = byteOffset
    }

    /// A zero-filled tensor.
    public init(zeros shape: [Int], dtype: DType = .float32) {
        self.init(dtype: dtype, shape: shape, storage: TensorStorage(byteCount: shape.reduce(1, *) * dtype.size))
    }

    /// A float32 tensor holding `values` (count must match the shape).
    public init(shape: [Int], floats values: [Float]) {
        precondition(values.count == shape.reduce(1, *), "\(values.count) values for shape \(shape)")
        self.init(zeros: shape, dtype: .float32)
        values.withUnsafeBufferPointer { src in
            if let b = src.baseAddress { floats.update(from: b, count: values.count) }
        }
    }

    /// A tensor holding `values` of an integer or float element type.
    public init<T: BitwiseCopyable>(shape: [Int], dtype: DType, values: [T]) {
        precondition(MemoryLayout<T>.size == dtype.size, "\(T.self) does not match \(dtype)")
        precondition(values.count == shape.reduce(1, *), "\(values.count) values for shape \(shape)")
        self.init(zeros: shape, dtype: dtype)
        let raw = self.raw
        values.withUnsafeBytes { raw.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    public var count: Int { shape.reduce(1, *) }
    public var byteCount: Int { count * dtype.size }
    public var rank: Int { shape.count }
    public var raw: UnsafeMutableRawPointer { storage.base + byteOffset }

    /// The elements as float32; the tensor must be float32.
    public var floats: UnsafeMutablePointer<Float> {
        precondition(dtype == .float32, "tensor is \(dtype), not float32")
        return raw.assumingMemoryBound(to: Float.self)
    }

    public func pointer<T>(as: T.Type) -> UnsafeMutablePointer<T> {
        precondition(MemoryLayout<T>.size == dtype.size, "\(T.self) does not match \(dtype)")
        return raw.assumingMemoryBound(to: T.self)
    }

    /// The same data under another shape with the same element count.
    public func reshaped(_ newShape: [Int]) -> Tensor {
        precondition(newShape.reduce(1, *) == count, "cannot reshape \(shape) to \(newShape)")
        return Tensor(dtype: dtype, shape: newShape, storage: storage, byteOffset: byteOffset)
    }

    /// Rows `range` of the first axis, sharing storage.
    public func slice(_ range: Range<Int>) -> Tensor {
        precondition(!shape.isEmpty && range.lowerBound >= 0 && range.upperBound <= shape[0])
        let rowBytes = shape.dropFirst().reduce(1, *) * dtype.size
        return Tensor(dtype: dtype, shape: [range.count] + shape.dropFirst(), storage: storage,
                      byteOffset: byteOffset + range.lowerBound * rowBytes)
    }

    /// An independent copy.
    public func copy() -> Tensor {
        let t = Tensor(zeros: shape, dtype: dtype)
        t.raw.copyMemory(from: raw, byteCount: byteCount)
        return t
    }

    /// Converts between any element types (floats round to nearest even; float to integer truncates).
    public func converted(to target: DType) -> Tensor {
        if target == dtype { return self }
        let out = Tensor(zeros: shape, dtype: target)
        let n = count
        switch (dtype, target) {
        case (.float16, .float32):
            FloatConversion.float16ToFloat(pointer(as: Float16.self), out.floats, count: n)
        case (.float32, .float16):
            FloatConversion.floatToFloat16(floats, out.pointer(as: Float16.self), count: n)
        case (.bfloat16, .float32):
            FloatConversion.bfloat16ToFloat(pointer(as: UInt16.self), out.floats, count: n)
        case (.float32, .bfloat16):
            FloatConversion.floatToBFloat16(floats, out.pointer(as: UInt16.self), count: n)
        default:
            // Rare paths (integers, float64, 16-bit to 16-bit): go through Double.
            for i in 0..<n { out.setElement(i, element(i)) }
        }
        return out
    }

    /// Element `i` (flat index) as a Double, whatever the dtype.
    public func element(_ i: Int) -> Double {
        switch dtype {
        case .float32: return Double(raw.load(fromByteOffset: i * 4, as: Float.self))
        case .float16: return Double(raw.load(fromByteOffset: i * 2, as: Float16.self))
        case .bfloat16: return Double(BFloat16(bitPattern: raw.load(fromByteOffset: i * 2, as: UInt16.self)).float)
        case .float64: return raw.load(fromByteOffset: i * 8, as: Double.self)
        case .int8: return Double(raw.load(fromByteOffset: i, as: Int8.self))
        case .uint8: return Double(raw.load(fromByteOffset: i, as: UInt8.self))
        case .bool: return raw.load(fromByteOffset: i, as: UInt8.self) != 0 ? 1 : 0
        case .int32: return Double(raw.load(fromByteOffset: i * 4, as: Int32.self))
        case .int64: return Double(raw.load(fromByteOffset: i * 8, as: Int64.self))
        }
    }

    /// Sets element `i` (flat index) from a Double, rounding or truncating to the dtype.
    public func setElement(_ i: Int, _ v: Double) {
        switch dtype {
        case .float32: raw.storeBytes(of: Float(v), toByteOffset: i * 4, as: Float.self)
        case .float16: raw.storeBytes(of: Float16(Float(v)), toByteOffset: i * 2, as: Float16.self)
        case .bfloat16: raw.storeBytes(of: BFloat16(Float(v)).bitPattern, toByteOffset: i * 2, as: UInt16.self)
        case .float64: raw.storeBytes(of: v, toByteOffset: i * 8, as: Double.self)
        case .int8: raw.storeBytes(of: Int8(clamping: Int(v)), toByteOffset: i, as: Int8.self)
        case .uint8: raw.storeBytes(of: UInt8(clamping: Int(v)), toByteOffset: i, as: UInt8.self)
        case .bool: raw.storeBytes(of: v != 0 ? 1 : 0, toByteOffset: i, as: UInt8.self)
        case .int32: raw.storeBytes(of: Int32(clamping: Int(v)), toByteOffset: i * 4, as: Int32.self)
        case .int64: raw.storeBytes(of: Int64(v), toByteOffset: i * 8, as: Int64.self)
        }
    }

    /// All elements as Float (any dtype).
    public func toFloatArray() -> [Float] {
        let t = dtype == .float32 ? self : converted(to: .float32)
        return Array(UnsafeBufferPointer(start: t.floats, count: count))
    }

    /// All elements as Int (integer dtypes; floats are truncated).
    public func toIntArray() -> [Int] { (0..<count).map { Int(element($0)) } }

    public var description: String { "Tensor(\(dtype), \(shape))" }
}

import Testing
@testable import DiffuseCore

/// Large buffers come from mmap and a cache of freed regions: every fresh tensor must still be
/// zero, aligned, and independent of the one whose memory it reuses.
@Suite("tensor storage")
struct TensorStorageTests {
    @Test("fresh large and small tensors are zeroed and 64-byte aligned, also when memory is reused",
          arguments: [1000, 300_000, 1 << 20, 3 << 20, 9 << 20, 20 << 20])
    func zeroedOnReuse(floats: Int) {
        for round in 0..<3 {
            let t = Tensor(zeros: [floats])
            #expect(Int(bitPattern: UnsafeRawPointer(t.floats)) % 64 == 0)
            let p = t.floats
            var nonZero = 0
            for i in stride(from: 0, to: floats, by: 97) where p[i] != 0 { nonZero += 1 }
            #expect(p[floats - 1] == 0 && nonZero == 0, "round \(round)")
            for i in 0..<floats { p[i] = Float(i % 13) + 1 }  // dirty it before it is freed
        }
    }

    @Test("live tensors never share memory")
    func distinct() {
        let a = Tensor(zeros: [1 << 20]), b = Tensor(zeros: [1 << 20])
        a.floats[0] = 1
        #expect(b.floats[0] == 0)
        #expect(UnsafeRawPointer(a.floats) != UnsafeRawPointer(b.floats))
    }
}

import CGOMP
#if canImport(Glibc)
import Glibc
#endif

/// Work split across the machine's cores on libgomp's thread pool — the same pool oneDNN runs
/// on. Sharing it matters: after a parallel region libgomp's threads spin for a while, so
/// kernels on a second pool (Dispatch) would fight them for the cores right after every
/// convolution. A region costs about a microsecond when the pool is warm.
public enum Parallel {
    /// Number of worker threads (`DIFFUSE_THREADS`, else `OMP_NUM_THREADS`, else the cores).
    public static let threads: Int = {
        if let s = Files.environment("DIFFUSE_THREADS"), let n = Int(s), n > 0 { return n }
        return max(1, Int(omp_get_max_threads()))
    }()

    private final class Job {
        let count: Int
        let body: (Int) -> Void
        /// The shared counter lives in manually allocated memory: a pointer to a class's
        /// stored property is not guaranteed to be the property itself.
        let next = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        init(count: Int, body: @escaping (Int) -> Void) {
            self.count = count
            self.body = body
            next.initialize(to: 0)
        }
        deinit { next.deallocate() }
    }

    /// Runs `body(i)` for i in 0..<count, spread over the threads (dynamic scheduling: each
    /// thread takes the next index from a shared counter).
    public static func forEach(_ count: Int, _ body: (Int) -> Void) {
        if count <= 0 { return }
        if count == 1 || threads == 1 {
            for i in 0..<count { body(i) }
            return
        }
        withoutActuallyEscaping(body) { body in
            let job = Job(count: count, body: body)
            let unmanaged = Unmanaged.passRetained(job)
            defer { unmanaged.release() }
            GOMP_parallel({ raw in
                let job = Unmanaged<Job>.fromOpaque(raw!).takeUnretainedValue()
                while true {
                    let i = diffuse_atomic_fetch_add(job.next, 1)
                    if i >= job.count { break }
                    job.body(i)
                }
            }, unmanaged.toOpaque(), UInt32(min(threads, count)), 0)
        }
    }

    /// The calling worker's index in 0..<threads (0 outside a parallel region), for
    /// per-thread scratch buffers.
    public static var threadIndex: Int { Int(omp_get_thread_num()) }

    /// Splits 0..<total into about `threads * 4` contiguous chunks (at least `grain` each) and
    /// runs `body(range)` on each in parallel.
    public static func chunks(_ total: Int, grain: Int = 1, _ body: (Range<Int>) -> Void) {
        if total <= 0 { return }
        let maxChunks = max(1, total / max(grain, 1))
        let n = min(maxChunks, threads == 1 ? 1 : threads * 4)
        if n <= 1 { body(0..<total); return }
        let step = (total + n - 1) / n
        let count = (total + step - 1) / step
        forEach(count) { c in
            let lo = c * step
            body(lo..<min(total, lo + step))
        }
    }
}

import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Prepared weights kept in a file instead of in the process's memory: the CPU form of
/// diffusers' `enable_sequential_cpu_offload`. Each tensor is written once into an unlinked
/// file on disk and mapped read-only; a step that reads one maps its pages in from the page
/// cache (`prefetch`) and drops them from the process right after (`dropResident`). The pages
/// stay in the kernel's page cache, clean and reclaimable: with memory to spare a step reads
/// them at memory speed, under memory pressure the kernel evicts them and the next step reads
/// the disk. So the process needs one layer's weights resident, not the model's.
///
/// The file must live on a disk: on tmpfs the "file" is memory that cannot be reclaimed
/// without swap, which saves nothing (a warning says so).
public final class SpillFile: @unchecked Sendable {
    public let directory: String
    private let fd: Int32
    /// Bytes written so far (each tensor starts on a page).
    private let size = Mutex(0)
    private static let page = max(Int(sysconf(Int32(_SC_PAGESIZE))), 4096)

    /// Where spill files go: `DIFFUSE_SPILL_DIR`, else /var/tmp (disk-backed on common systems,
    /// unlike /tmp, which is tmpfs on many).
    public static var defaultDirectory: String { Files.environment("DIFFUSE_SPILL_DIR") ?? "/var/tmp" }

    public init(directory: String = SpillFile.defaultDirectory) throws {
        self.directory = directory
        var template = Array("\(directory)/diffuse-weights-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else {
            throw SpillError("cannot create a weight spill file in \(directory): \(String(cString: strerror(errno))) "
                + "(set DIFFUSE_SPILL_DIR to a writable directory on a disk)")
        }
        // Unlinked at once: the space is the kernel's to reclaim when the last mapping goes.
        _ = template.withUnsafeBufferPointer { unlink($0.baseAddress!) }
        self.fd = fd
        if Self.filesystemType(of: directory) == "tmpfs" {
            Log.info("\(directory) is tmpfs: spilled weights stay in memory there; set DIFFUSE_SPILL_DIR to a directory on a disk")
        }
    }

    deinit { close(fd) }

    /// The type of the filesystem `path` is on, from the longest mount point of /proc/mounts
    /// that contains it.
    static func filesystemType(of path: String) -> String? {
        guard let mounts = try? Files.readText("/proc/mounts") else { return nil }
        var best: (point: String, type: String)?
        for line in mounts.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count >= 3 else { continue }
            let point = String(f[1])
            let inside = point == "/" || path == point || path.hasPrefix(point + "/")
            if inside, point.count > (best?.point.count ?? -1) { best = (point, String(f[2])) }
        }
        return best?.type
    }

    /// Bytes written so far.
    public var bytes: Int { size.withLock { $0 } }

    /// Writes `tensor` to the file and returns a read-only tensor mapped from it (the original
    /// can be dropped). Its pages are not resident until read.
    public func store(_ tensor: Tensor) throws -> (tensor: Tensor, region: SpilledRegion) {
        let count = tensor.byteCount
        let offset = size.withLock { size in
            defer { size += (count + Self.page - 1) / Self.page * Self.page }
            return size
        }
        var done = 0
        while done < count {
            let n = pwrite(fd, tensor.raw + done, count - done, off_t(offset + done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw SpillError("writing \(count >> 20) MiB of weights to the spill file in \(directory) failed: "
                    + (n < 0 ? String(cString: strerror(errno)) : "no progress") + " (is the disk full? DIFFUSE_SPILL_DIR chooses another)")
            }
            done += n
        }
        let length = max(count, 1)
        guard let p = mmap(nil, length, PROT_READ, MAP_SHARED, fd, off_t(offset)), p != MAP_FAILED else {
            throw SpillError("mapping spilled weights from \(directory) failed: \(String(cString: strerror(errno)))")
        }
        let region = SpilledRegion(start: p, length: length)
        let storage = TensorStorage(borrowing: p, byteCount: count, owner: region)
        return (Tensor(dtype: tensor.dtype, shape: tensor.shape, storage: storage), region)
    }
}

/// One spilled tensor's mapping.
public final class SpilledRegion: @unchecked Sendable {
    public let start: UnsafeMutableRawPointer
    public let length: Int

    init(start: UnsafeMutableRawPointer, length: Int) {
        self.start = start
        self.length = length
    }

    deinit { munmap(start, length) }

    /// Maps the region's pages in with one call (MADV_POPULATE_READ, Linux 5.14+) instead of a
    /// page fault per few pages; on older kernels the reads fault them in.
    public func prefetch() { _ = madvise(start, length, 22 /* MADV_POPULATE_READ */) }

    /// Takes the pages out of the process (they stay in the page cache).
    public func dropResident() { _ = madvise(start, length, MADV_DONTNEED) }
}

public struct SpillError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

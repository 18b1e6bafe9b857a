#if canImport(Glibc)
import Glibc
#endif

/// A pthread mutex (FoundationEssentials has no NSLock).
public final class NSLockLite: @unchecked Sendable {
    private var m = pthread_mutex_t()
    public init() { pthread_mutex_init(&m, nil) }
    deinit { pthread_mutex_destroy(&m) }
    public func lock() { pthread_mutex_lock(&m) }
    public func unlock() { pthread_mutex_unlock(&m) }
    public func withLock<R>(_ body: () throws -> R) rethrows -> R {
        lock()
        defer { unlock() }
        return try body()
    }
}

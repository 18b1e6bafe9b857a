#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore

/// Models that huggingface_hub (and so diffusers) already downloaded, found by repo id in its
/// cache: `models--ORG--NAME/refs/<revision>` holds a commit hash, `snapshots/<commit>/` the
/// files, as links into `blobs/`. Nothing is ever downloaded.
public enum HuggingFaceCache {
    /// huggingface_hub's order: `HF_HUB_CACHE`, the older `HUGGINGFACE_HUB_CACHE`, `HF_HOME/hub`,
    /// `XDG_CACHE_HOME/huggingface/hub`, then `~/.cache/huggingface/hub`.
    public static var directory: String {
        if let d = env("HF_HUB_CACHE") ?? env("HUGGINGFACE_HUB_CACHE") { return expandHome(d) }
        if let home = env("HF_HOME") { return Files.join(expandHome(home), "hub") }
        if let xdg = env("XDG_CACHE_HOME") { return Files.join(expandHome(xdg), "huggingface/hub") }
        return Files.join(env("HOME") ?? "~", ".cache/huggingface/hub")
    }

    /// `ORG/NAME` with Hugging Face's characters (letters, digits, `-`, `_`, `.`), optionally `@revision`.
    public static func parseRepoID(_ text: String) -> (repo: String, revision: String?)? {
        let parts = text.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false)
        let repo = String(parts[0])
        let revision = parts.count > 1 ? String(parts[1]) : nil
        if let revision, revision.isEmpty || revision.contains("..") { return nil }
        let pieces = repo.split(separator: "/", omittingEmptySubsequences: false)
        guard pieces.count == 2 else { return nil }
        for piece in pieces {
            guard let first = piece.first, first.isLetter || first.isNumber,
                  !piece.contains(".."),
                  piece.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) })
            else { return nil }
        }
        return (repo, revision)
    }

    /// The snapshot folder of `repo` at `revision` (a branch or tag under `refs/`, or a commit
    /// hash), and its commit.
    public static func snapshot(repo: String, revision: String?, cache: String? = nil) throws -> (folder: String, commit: String) {
        let cache = cache ?? directory
        let repoFolder = Files.join(cache, "models--" + repo.split(separator: "/").joined(separator: "--"))
        guard Files.isDirectory(repoFolder) else {
            throw ModelSourceError.notInCache(repo: repo, cache: cache, detail: "no folder \(repoFolder); download it first, for example with `hf download \(repo)`")
        }
        let revision = revision ?? "main"
        let snapshots = Files.join(repoFolder, "snapshots")
        let commit: String
        let refFile = Files.join(repoFolder, "refs", revision)
        if Files.exists(refFile) && !Files.isDirectory(refFile) {
            commit = try Files.readText(refFile).trimmingWhitespace
            guard !commit.isEmpty, !commit.contains("/") else {
                throw ModelSourceError.notInCache(repo: repo, cache: cache, detail: "\(refFile) does not hold a commit hash")
            }
        } else if Files.isDirectory(Files.join(snapshots, revision)) {
            commit = revision  // a commit hash given directly
        } else {
            let refs = (try? listRefs(Files.join(repoFolder, "refs"))) ?? []
            let known = refs.isEmpty ? "it has no refs" : "its refs are " + refs.joined(separator: ", ")
            throw ModelSourceError.notInCache(repo: repo, cache: cache, detail: "revision '\(revision)' is neither in \(repoFolder)/refs nor a snapshot (\(known))")
        }
        let folder = Files.join(snapshots, commit)
        guard Files.isDirectory(folder) else {
            throw ModelSourceError.notInCache(repo: repo, cache: cache, detail: "refs/\(revision) points at \(commit), but \(folder) is missing")
        }
        return (folder, commit)
    }

    /// Branch and tag names under `refs/` (`main`, `pr/1`).
    private static func listRefs(_ folder: String, prefix: String = "") throws -> [String] {
        var names: [String] = []
        for entry in try Files.list(folder) {
            let path = Files.join(folder, entry)
            if Files.isDirectory(path) { names += try listRefs(path, prefix: prefix + entry + "/") } else { names.append(prefix + entry) }
        }
        return names
    }

    private static func env(_ name: String) -> String? {
        Files.environment(name).flatMap { $0.isEmpty ? nil : $0 }
    }

    private static func expandHome(_ path: String) -> String {
        guard path == "~" || path.hasPrefix("~/") else { return path }
        return (env("HOME") ?? "~") + path.dropFirst()
    }
}

extension String {
    var trimmingWhitespace: String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { !$0.properties.isWhitespace }),
              let last = scalars.lastIndex(where: { !$0.properties.isWhitespace }) else { return "" }
        return String(scalars[first...last])
    }
}

/// Files that may be links (the cache's snapshots link every file into `blobs/`).
enum Links {
    /// The link's target when `path` is a link whose target does not exist.
    static func danglingTarget(_ path: String) -> String? {
        var st = stat()
        guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFLNK, !Files.exists(path) else { return nil }
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(path, &buffer, buffer.count - 1)
        return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
    }

    /// Throws `brokenLink` for a dangling link, so that an interrupted download is named as such.
    static func checkNotDangling(_ path: String) throws {
        if let target = danglingTarget(path) { throw ModelSourceError.brokenLink(path: path, target: target) }
    }
}

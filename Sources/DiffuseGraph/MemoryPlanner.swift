/// Assigns every intermediate value a place in one arena so that values alive at the same
/// time never overlap: peak memory is the largest live set, not the sum of all values.
public struct MemoryPlan: Sendable {
    /// Per value: byte offset in the arena, or nil when the value lives elsewhere
    /// (parameters, constants, graph inputs) or needs no storage.
    public var offsets: [Int?]
    /// Per value: its buffer index (views and in-place results share their input's buffer), or -1.
    public var buffers: [Int]
    public var arenaBytes: Int
    /// Sum of all buffers' sizes: what a planner-less executor would allocate.
    public var unplannedBytes: Int
}

public enum Storage {
    /// Needs a buffer of its own in the arena.
    case own(bytes: Int)
    /// Shares the buffer of input `i` (reshape, or a slice a backend reads with an offset).
    case view(input: Int, byteOffset: Int)
    /// May write over input `i`'s buffer if nothing reads that buffer later; else its own.
    case inPlace(input: Int, bytes: Int)
    /// Lives outside the arena (parameters, constants, inputs).
    case external
}

public enum MemoryPlanner {
    public static let alignment = 64

    /// Plans `graph` with `storage` saying how each node's value is stored.
    public static func plan(_ graph: Graph, storage: (Int) -> Storage) -> MemoryPlan {
        plan(inputs: graph.nodes.map { $0.inputs.map(\.index) }, lastUse: graph.lastUses(), storage: storage)
    }

    /// Plans a program of `inputs.count` steps in order; step i reads the values `inputs[i]`
    /// and its value is last read by step `lastUse[i]` (outputs: past the last step).
    public static func plan(inputs: [[Int]], lastUse: [Int], storage: (Int) -> Storage) -> MemoryPlan {
        let n = inputs.count
        var bufferOf = Array(repeating: -1, count: n)
        var viewOffset = Array(repeating: 0, count: n)
        var size: [Int] = []
        var start: [Int] = []
        var end: [Int] = []

        func newBuffer(_ i: Int, _ bytes: Int) {
            bufferOf[i] = size.count
            size.append((bytes + alignment - 1) / alignment * alignment)
            start.append(i)
            end.append(max(lastUse[i], i))
        }

        for i in 0..<n {
            switch storage(i) {
            case .external:
                break
            case .own(let bytes):
                newBuffer(i, bytes)
            case .view(let input, let off):
                let src = inputs[i][input]
                let b = bufferOf[src]
                if b < 0 { break }  // a view of an external value is itself external
                bufferOf[i] = b
                viewOffset[i] = viewOffset[src] + off
                end[b] = max(end[b], lastUse[i])
            case .inPlace(let input, let bytes):
                let src = inputs[i][input]
                let b = bufferOf[src]
                if b >= 0, end[b] == i, viewOffset[src] == 0, size[b] >= bytes {
                    bufferOf[i] = b
                    end[b] = max(end[b], lastUse[i])
                } else {
                    newBuffer(i, bytes)
                }
            }
        }

        // Greedy by size: place the largest buffers first at the lowest offset that does not
        // collide with an already placed buffer whose lifetime overlaps.
        let order = size.indices.sorted { size[$0] != size[$1] ? size[$0] > size[$1] : start[$0] < start[$1] }
        var placedOffset = Array(repeating: 0, count: size.count)
        var placed: [Int] = []
        var arena = 0
        for b in order {
            var conflicts: [(Int, Int)] = []
            for p in placed where start[p] <= end[b] && start[b] <= end[p] {
                conflicts.append((placedOffset[p], placedOffset[p] + size[p]))
            }
            conflicts.sort { $0.0 < $1.0 }
            var offset = 0
            for (lo, hi) in conflicts {
                if offset + size[b] <= lo { break }
                offset = max(offset, hi)
            }
            placedOffset[b] = offset
            placed.append(b)
            arena = max(arena, offset + size[b])
        }
        var offsets = [Int?](repeating: nil, count: n)
        for i in 0..<n where bufferOf[i] >= 0 { offsets[i] = placedOffset[bufferOf[i]] + viewOffset[i] }
        return MemoryPlan(offsets: offsets, buffers: bufferOf, arenaBytes: arena,
                          unplannedBytes: size.reduce(0, +))
    }
}

#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore

/// numpy's `np.random.SeedSequence(entropy, spawn_key=..., pool_size=...)` and its
/// `generate_state(n)` (uint32 words): the hash that turns one integer seed and a path of child
/// indices into independent seeds. torchsde seeds every node of its Brownian tree this way.
struct NumPySeedSequence {
    private var pool: [UInt32]

    init(entropy: UInt64, spawnKey: [UInt64] = [], poolSize: Int = 4) {
        var entropyWords = Self.words(entropy)
        let spawnWords = spawnKey.flatMap(Self.words)
        // A spawned sequence pads the run entropy to the pool, so that children cannot collide with roots.
        if !spawnWords.isEmpty && entropyWords.count < poolSize {
            entropyWords += Array(repeating: 0, count: poolSize - entropyWords.count)
        }
        let assembled = entropyWords + spawnWords
        var hashConst: UInt32 = 0x43B0_D7E5
        func hashmix(_ value: UInt32) -> UInt32 {
            var v = value ^ hashConst
            hashConst = hashConst &* 0x931E_8875
            v = v &* hashConst
            return v ^ (v >> 16)
        }
        func mix(_ x: UInt32, _ y: UInt32) -> UInt32 {
            let r = 0xCA01_F9DD &* x &- 0x4973_F715 &* y
            return r ^ (r >> 16)
        }
        var mixer = (0..<poolSize).map { hashmix($0 < assembled.count ? assembled[$0] : 0) }
        for source in 0..<poolSize {
            for destination in 0..<poolSize where source != destination {
                mixer[destination] = mix(mixer[destination], hashmix(mixer[source]))
            }
        }
        for source in poolSize..<max(poolSize, assembled.count) {
            for destination in 0..<poolSize {
                mixer[destination] = mix(mixer[destination], hashmix(assembled[source]))
            }
        }
        pool = mixer
    }

    /// `generate_state(n)` as uint32.
    func generateState(_ n: Int) -> [UInt32] {
        var hashConst: UInt32 = 0x8B51_F9DD
        return (0..<n).map { i in
            var v = pool[i % pool.count] ^ hashConst
            hashConst = hashConst &* 0x58F3_8DED
            v = v &* hashConst
            return v ^ (v >> 16)
        }
    }

    /// numpy's `_int_to_uint32_array`: little-endian 32-bit words, one word for 0.
    private static func words(_ n: UInt64) -> [UInt32] {
        n >> 32 == 0 ? [UInt32(n)] : [UInt32(truncatingIfNeeded: n), UInt32(n >> 32)]
    }
}

/// torchsde's `BrownianInterval` as diffusers' `BatchedBrownianTree` builds it
/// (`halfway_tree=True, tol=1e-6, pool_size=24`, no Lévy area): a Brownian motion W on [t0, t1]
/// whose value over any query interval depends only on the entropy, not on the order or the
/// number of queries. The root draws W(t1) − W(t0); each node split at its (rounded) midpoint
/// draws the left half's increment from a Brownian bridge, seeded by a `SeedSequence` spawned
/// from the entropy with the node's path. A query is answered by the nodes that tile it, so two
/// steps that ask for overlapping intervals get consistent noise.
///
/// The arithmetic is torch's: float32 tensors scaled by float32-rounded Python floats, in the same
/// order, so the increments are bit for bit torchsde's for the same generator.
public final class BrownianTree {
    private final class Node {
        let start: Double, end: Double
        unowned(unsafe) let parent: Node?
        let isLeft: Bool
        /// torchsde's `_spawn_key` and `_depth`: the path from the root (left 0, right 1).
        let spawnKey: UInt64, depth: UInt64
        var midway: Double?
        var left: Node?, right: Node?
        /// The seed of the bridge sample that splits this node (`_W_seed`).
        var bridgeSeed: UInt64 = 0
        /// This node's increment, while cached.
        var increment: Tensor?

        init(start: Double, end: Double, parent: Node?, isLeft: Bool, spawnKey: UInt64, depth: UInt64) {
            (self.start, self.end, self.parent, self.isLeft, self.spawnKey, self.depth) = (start, end, parent, isLeft, spawnKey, depth)
        }
    }

    public let shape: [Int]
    public let entropy: UInt64
    /// torchsde's `round(x, ndigits)` of every time, `ndigits = -int(log10(tol))`.
    private let digits: Int32
    private let poolSize: Int
    private let makeGenerator: (UInt64) -> RandomSource
    private let root: Node
    /// Nodes holding an increment, oldest first (the root's is never dropped). torchsde keeps an
    /// LRU of 45; the values do not depend on it, only the recomputation does.
    private var cached: [Node] = []
    private let cacheSize = 64

    /// - makeGenerator: `torch.Generator(device).manual_seed(seed)` for the tensors' device.
    public init(t0: Double, t1: Double, shape: [Int], entropy: UInt64, tolerance: Double = 1e-6, poolSize: Int = 24,
                makeGenerator: @escaping (UInt64) -> RandomSource = { TorchCPUGenerator(seed: $0) }) throws {
        guard tolerance > 0, t0 <= t1 else {
            throw SchedulerError.invalidConfig(origin: "BrownianTree", detail: "a Brownian path needs t0 ≤ t1 and a positive tolerance (got [\(t0), \(t1)], tol \(tolerance))")
        }
        self.shape = shape
        self.entropy = entropy
        let digits = Int32(-log10(tolerance))
        self.digits = digits
        self.poolSize = poolSize
        self.makeGenerator = makeGenerator
        root = Node(start: BrownianTree.pythonRound(t0, digits: digits), end: BrownianTree.pythonRound(t1, digits: digits),
                    parent: nil, isLeft: false, spawnKey: 0, depth: 0)
        let seeds = NumPySeedSequence(entropy: entropy, poolSize: poolSize).generateState(3)
        let w = try makeGenerator(UInt64(seeds[0])).randn(shape)
        root.increment = BrownianTree.scaled(w, by: (t1 - t0).squareRoot())
    }

    /// W(tb) − W(ta) for t0 ≤ ta ≤ tb ≤ t1 (torchsde's `__call__(ta, tb)`); times outside the
    /// interval are clamped to it, as torchsde does with a warning.
    public func increment(from ta: Double, to tb: Double) throws -> Tensor {
        let a = round(min(max(ta, root.start), root.end)), b = round(min(max(tb, root.start), root.end))
        guard a < b else { return Tensor(zeros: shape, dtype: .float32) }
        var pieces: [Node] = []
        locate(root, a, b, into: &pieces)
        var total = try increment(of: pieces[0])
        for piece in pieces.dropFirst() {
            let w = try increment(of: piece)
            let out = Tensor(zeros: shape, dtype: .float32)
            withExtendedLifetime((total, w)) {
                let x = total.floats, y = w.floats, o = out.floats
                for e in 0..<out.count { o[e] = x[e] + y[e] }
            }
            total = out
        }
        return total
    }

    private func round(_ x: Double) -> Double { BrownianTree.pythonRound(x, digits: digits) }

    /// torchsde's `_loc_inner`: the nodes tiling [ta, tb], splitting nodes on the way.
    private func locate(_ node: Node, _ ta: Double, _ tb: Double, into out: inout [Node]) {
        var node = node
        while true {
            if ta == node.start && tb == node.end { out.append(node); return }
            guard let midway = node.midway else {
                // torchsde then tries one child and climbs back to this node when the query
                // overhangs it; looking at this node again, now split, finds the same nodes.
                split(node, towards: ta == node.start ? tb : ta)
                continue
            }
            if tb <= midway { node = node.left!; continue }
            if ta >= midway { node = node.right!; continue }
            locate(node.left!, ta, midway, into: &out)
            node = node.right!
            return locate(node, midway, tb, into: &out)
        }
    }

    /// The halfway tree's `_split`: halve until `point` is a node boundary.
    private func split(_ node: Node, towards point: Double) {
        var node = node
        while true {
            if node.midway == nil { splitExactly(node) }
            let midway = node.midway!
            if point > midway { node = node.right! } else if point < midway { node = node.left! } else { return }
        }
    }

    private func splitExactly(_ node: Node) {
        let midway = 0.5 * (node.end + node.start)
        let rounded = round(midway)
        node.midway = rounded
        let seeds = NumPySeedSequence(entropy: entropy, spawnKey: [node.spawnKey, node.depth], poolSize: poolSize).generateState(4)
        node.bridgeSeed = UInt64(seeds[0])
        let key = node.spawnKey, depth = node.depth + 1
        // Halving stops at the tolerance, about 30 levels for any sigma range.
        guard key < 1 << 62 else { preconditionFailure("Brownian tree deeper than 62 levels") }
        node.left = Node(start: node.start, end: round(midway), parent: node, isLeft: true, spawnKey: 2 * key, depth: depth)
        node.right = Node(start: round(midway), end: node.end, parent: node, isLeft: false, spawnKey: 2 * key + 1, depth: depth)
    }

    /// A node's increment: its parent's split by a Brownian bridge at the parent's midway.
    private func increment(of node: Node) throws -> Tensor {
        if let w = node.increment { return w }
        guard let parent = node.parent, let midway = parent.midway else { preconditionFailure("an unsplit node has no parent increment") }
        let whole = try increment(of: parent)
        let hReciprocal = 1 / (parent.end - parent.start)
        let leftDiff = midway - parent.start, rightDiff = parent.end - midway
        let noise = try makeGenerator(parent.bridgeSeed).randn(shape)
        // left = left_diff·W·h⁻¹ + √(left_diff·right_diff·h⁻¹)·noise; right = W − left.
        let a = Float(leftDiff), b = Float(hReciprocal), c = Float((leftDiff * rightDiff * hReciprocal).squareRoot())
        let out = Tensor(zeros: shape, dtype: .float32)
        withExtendedLifetime((whole, noise)) {
            let w = whole.floats, n = noise.floats, o = out.floats
            for e in 0..<out.count {
                let leftW = w[e] * a * b + n[e] * c
                o[e] = node.isLeft ? leftW : w[e] - leftW
            }
        }
        node.increment = out
        cached.append(node)
        if cached.count > cacheSize { cached.removeFirst().increment = nil }
        return out
    }

    private static func scaled(_ x: Tensor, by s: Double) -> Tensor {
        let out = Tensor(zeros: x.shape, dtype: .float32)
        let f = Float(s)
        withExtendedLifetime(x) {
            let src = x.floats, dst = out.floats
            for e in 0..<out.count { dst[e] = src[e] * f }
        }
        return out
    }

    /// Python's `round(x, digits)`: the nearest double to x correctly rounded to `digits` decimals
    /// (glibc's printf rounds the exact binary value half to even, as Python's dtoa does).
    static func pythonRound(_ x: Double, digits: Int32) -> Double {
        var buffer = [CChar](repeating: 0, count: 512)
        let written = withVaList([digits, x]) { vsnprintf(&buffer, buffer.count, "%.*f", $0) }
        guard written > 0 && Int(written) < buffer.count else { return x }
        return strtod(buffer, nil)
    }
}

/// diffusers' `BrownianTreeNoiseSampler` (with `BatchedBrownianTree` and one seed): the noise of
/// a step from σ to σ_next is the path's increment over [σ_next, σ], normalised to unit variance
/// by √|σ_next − σ|. Its times are the float32 sigmas diffusers passes.
public final class BrownianTreeNoiseSampler {
    public let tree: BrownianTree

    /// A path over [sigmaMin, sigmaMax] (float32 values) for samples of `shape`.
    public init(sigmaMin: Float, sigmaMax: Float, shape: [Int], seed: UInt64,
                makeGenerator: @escaping (UInt64) -> RandomSource = { TorchCPUGenerator(seed: $0) }) throws {
        tree = try BrownianTree(t0: Double(sigmaMin), t1: Double(sigmaMax), shape: shape, entropy: seed, makeGenerator: makeGenerator)
    }

    /// The noise between `sigma` and `sigmaNext`: the increment (its sign that of σ_next − σ) and
    /// the factor 1/√|σ_next − σ| (float32, as torch computes it) to multiply it by.
    public func noise(sigma: Float, sigmaNext: Float) throws -> (increment: Tensor, scale: Double) {
        let (lo, hi, sign) = sigma < sigmaNext ? (sigma, sigmaNext, 1.0) : (sigmaNext, sigma, -1.0)
        let w = try tree.increment(from: Double(lo), to: Double(hi))
        // Equal sigmas have no noise (torch would divide 0 by 0).
        return (w, lo == hi ? 0 : sign / Double(abs(sigmaNext - sigma).squareRoot()))
    }
}

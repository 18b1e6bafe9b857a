import DiffuseCore
import DiffuseGraph

/// Gives every value the dtype it has on the device and inserts the casts that makes
/// necessary, so each kernel sees one storage type:
/// - float values are stored in the activation type `T` (float32, float16 or bfloat16);
/// - conv/linear weights are stored in `weightStorage` and widened by a cast before use when it
///   differs from `T` (16-bit storage halves weight memory);
/// - graph inputs keep their declared dtype (timesteps stay float32: 999 is not a bfloat16);
///   timestep embedding reads float32 and writes `T`;
/// - integer values (ids) keep their type; layout ops (reshape, permute, slice, concat,
///   upsample) keep their input's type;
/// - a graph `cast` to a float type means "to T", to an integer type a real conversion.
/// In the result, `.cast(d)` always converts to exactly `d`.
func lowerForDevice(_ g: Graph, activation T: DType, weightStorage W: DType) -> Graph {
    // Parameters read only as conv/linear weights are stored in W.
    var weightOnly = [Bool](repeating: true, count: g.nodes.count)
    var isParameter = [Bool](repeating: false, count: g.nodes.count)
    for (i, n) in g.nodes.enumerated() {
        if case .parameter = n.op { isParameter[i] = true }
        for (slot, v) in n.inputs.enumerated() {
            var asWeight = false
            switch n.op {
            case .conv2d, .linear: asWeight = slot == 1
            default: break
            }
            if !asWeight { weightOnly[v.index] = false }
        }
    }
    for (_, v) in g.outputs { weightOnly[v.index] = false }

    var out = Graph()
    var map = [Int](repeating: -1, count: g.nodes.count)
    var casts: [Int: [DType: Int]] = [:]

    func append(_ template: Node, _ op: Op, _ inputs: [Int], _ shape: [Int], _ dtype: DType) -> Int {
        out.append(template, op, inputs, shape: shape, dtype: dtype)
    }
    /// Value `v` (lowered index) as dtype `d`, casting once per (value, dtype).
    func need(_ v: Int, _ d: DType) -> Int {
        let n = out.nodes[v]
        if n.dtype == d { return v }
        if let c = casts[v]?[d] { return c }
        let c = out.append(n, .cast(d), [v], shape: n.shape, dtype: d, channelsLast: false)  // elementwise: no layout of its own
        casts[v, default: [:]][d] = c
        return c
    }
    func storage(_ d: DType) -> DType { d.isFloatingPoint ? T : d }

    for (i, node) in g.nodes.enumerated() {
        let ins = node.inputs.map { map[$0.index] }
        func inputType(_ k: Int) -> DType { out.nodes[ins[k]].dtype }
        switch node.op {
        case .input:
            map[i] = append(node, node.op, [], node.shape, node.dtype)
        case .parameter:
            map[i] = append(node, node.op, [], node.shape, isParameter[i] && weightOnly[i] ? W : T)
        case .constant(let c):
            map[i] = append(node, node.op, [], node.shape, storage(c.tensor.dtype))
        case .cast(let d):
            map[i] = need(ins[0], storage(d))
        case .reshape, .permute, .slice, .upsampleNearest2x:
            map[i] = append(node, node.op, [ins[0]], node.shape, inputType(0))
        case .concat:
            let types = Set(ins.map { out.nodes[$0].dtype })
            let d = types.count == 1 ? types.first! : T
            map[i] = append(node, node.op, ins.map { need($0, d) }, node.shape, d)
        case .embedding:
            let idType = inputType(0)
            let ids = idType == .int32 || idType == .int64 ? ins[0] : need(ins[0], .int32)
            map[i] = append(node, node.op, [ids, need(ins[1], T)], node.shape, T)
        case .timestepEmbedding:
            map[i] = append(node, node.op, [need(ins[0], .float32)], node.shape, T)
        default:
            map[i] = append(node, node.op, ins.map { need($0, T) }, node.shape, T)
        }
    }
    out.outputs = g.outputs.map { ($0.name, ValueID(map[$0.value.index])) }
    return out
}

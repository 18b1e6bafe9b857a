/// A naming scope for parameters, mirroring torch's module paths:
/// `p["down_blocks"][0]["resnets"][1]["conv1"]` names `down_blocks.0.resnets.1.conv1.*`.
public struct Params {
    public let builder: GraphBuilder
    public let prefix: String

    public init(_ builder: GraphBuilder, prefix: String = "") {
        self.builder = builder
        self.prefix = prefix
    }

    public subscript(_ name: String) -> Params {
        Params(builder, prefix: prefix.isEmpty ? name : "\(prefix).\(name)")
    }

    public subscript(_ index: Int) -> Params { self[String(index)] }

    /// Declares the parameter `prefix.name` with its expected shape.
    public func weight(_ name: String, _ shape: [Int]) -> Value {
        builder.parameter(prefix.isEmpty ? name : "\(prefix).\(name)", shape: shape)
    }

    /// Runs `body` with emitted ops attributed to this module path (`prefix` is already the
    /// full path, so it replaces the enclosing scope rather than extending it).
    public func scope<R>(_ body: () throws -> R) rethrows -> R {
        try builder.withScope(absolute: prefix, body)
    }
}

/// torch.nn.Linear.
public struct Linear {
    public let weight: Value
    public let bias: Value?

    public init(_ p: Params, _ inFeatures: Int, _ outFeatures: Int, bias: Bool = true) {
        weight = p.weight("weight", [outFeatures, inFeatures])
        self.bias = bias ? p.weight("bias", [outFeatures]) : nil
    }

    public func callAsFunction(_ x: Value) -> Value { x.linear(weight, bias) }
}

/// torch.nn.Conv2d (square kernels, symmetric padding; see `Conv2dAttributes` for the rest).
public struct Conv2d {
    public let weight: Value
    public let bias: Value?
    public let attributes: Conv2dAttributes

    public init(_ p: Params, _ inChannels: Int, _ outChannels: Int, kernel: Int, stride: Int = 1, padding: Int = 0,
                bias: Bool = true) {
        weight = p.weight("weight", [outChannels, inChannels, kernel, kernel])
        self.bias = bias ? p.weight("bias", [outChannels]) : nil
        attributes = Conv2dAttributes(stride: (stride, stride), padding: (padding, padding, padding, padding))
    }

    public init(_ p: Params, _ inChannels: Int, _ outChannels: Int, kernel: Int, attributes: Conv2dAttributes,
                bias: Bool = true) {
        weight = p.weight("weight", [outChannels, inChannels / attributes.groups, kernel, kernel])
        self.bias = bias ? p.weight("bias", [outChannels]) : nil
        self.attributes = attributes
    }

    public func callAsFunction(_ x: Value) -> Value { x.conv2d(weight, bias, attributes: attributes) }
}

/// torch.nn.GroupNorm (affine).
public struct GroupNorm {
    public let groups: Int
    public let eps: Float
    public let weight: Value
    public let bias: Value

    public init(_ p: Params, groups: Int, channels: Int, eps: Float = 1e-5) {
        if channels % groups != 0 {
            p.builder.fail("\(p.prefix): \(channels) channels are not divisible into \(groups) groups")
        }
        self.groups = groups
        self.eps = eps
        weight = p.weight("weight", [channels])
        bias = p.weight("bias", [channels])
    }

    public func callAsFunction(_ x: Value) -> Value { x.groupNorm(groups: groups, eps: eps, weight: weight, bias: bias) }
}

/// torch.nn.LayerNorm over the last axis (affine).
public struct LayerNorm {
    public let eps: Float
    public let weight: Value
    public let bias: Value

    public init(_ p: Params, _ dim: Int, eps: Float = 1e-5) {
        self.eps = eps
        weight = p.weight("weight", [dim])
        bias = p.weight("bias", [dim])
    }

    public func callAsFunction(_ x: Value) -> Value { x.layerNorm(eps: eps, weight: weight, bias: bias) }
}

/// torch.nn.Embedding.
public struct Embedding {
    public let weight: Value

    public init(_ p: Params, count: Int, dim: Int) {
        weight = p.weight("weight", [count, dim])
    }

    public func callAsFunction(_ ids: Value) -> Value { ids.embedding(weight) }
}

extension Value {
    /// torch.nn.PixelUnshuffle(r): [N, C, H, W] → [N, C·r², H/r, W/r], channel c·r² + i·r + j
    /// holding pixel (i, j) of each r×r cell.
    public func pixelUnshuffle(_ r: Int) -> Value {
        guard rank == 4, shape[2] % r == 0, shape[3] % r == 0 else {
            builder.fail("pixel unshuffle by \(r): input \(shape) is not 4-D with sides divisible by \(r)")
            return self
        }
        let (n, c, h, w) = (shape[0], shape[1], shape[2] / r, shape[3] / r)
        return reshape([n, c, h, r, w, r]).permute([0, 1, 3, 5, 2, 4]).reshape([n, c * r * r, h, w])
    }

    /// torch.nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True): an odd last row or column
    /// makes windows of the pixels they hold, averaged over those alone. Each window is summed
    /// in torch's order (row by row) and divided by its count, exactly as torch does.
    public func avgPool2x2Ceil() -> Value {
        guard rank == 4 else { builder.fail("average pooling: input \(shape) is not 4-D"); return self }
        let (n, c) = (shape[0], shape[1])
        let oddRows = shape[2] % 2 == 1, oddColumns = shape[3] % 2 == 1
        // Zeros (from the data itself, so they keep its type) fill the odd edge: adding them leaves sums as torch's.
        var x = self
        if oddRows { x = Value.concat([x, x.slice(axis: 2, start: shape[2] - 1, length: 1).affine(scale: 0)], axis: 2) }
        if oddColumns { x = Value.concat([x, x.slice(axis: 3, start: x.shape[3] - 1, length: 1).affine(scale: 0)], axis: 3) }
        let (h, w) = (x.shape[2] / 2, x.shape[3] / 2)
        let sums = x.reshape([n, c, h, 2, w, 2]).permute([0, 1, 2, 4, 3, 5]).reshape([n, c, h, w, 4])
            .reduce(.sum, axes: [4]).reshape([n, c, h, w])
        // The divisor (4, 2 on an odd edge, 1 in an odd corner) is a power of two per axis, so
        // halving per axis is exact.
        func halve(_ v: Value, axis: Int, oddEdge: Bool) -> Value {
            let m = v.shape[axis]
            guard oddEdge else { return v.affine(scale: 0.5) }
            let edge = v.slice(axis: axis, start: m - 1, length: 1)
            return m == 1 ? edge : Value.concat([v.slice(axis: axis, start: 0, length: m - 1).affine(scale: 0.5), edge], axis: axis)
        }
        return halve(halve(sums, axis: 2, oddEdge: oddRows), axis: 3, oddEdge: oddColumns)
    }
}

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

import DiffuseGraph

/// Eight-lane float math for AVX2. Swift's generic SIMD helpers (`clamped`, `rounded`,
/// rounding conversions) compile to out-of-line calls here, so these use only arithmetic,
/// comparisons with `replacing`, and bit casts — all of which lower to single instructions.
typealias F8 = SIMD8<Float>

@inline(__always) func vmin(_ a: F8, _ b: F8) -> F8 { a.replacing(with: b, where: b .< a) }
@inline(__always) func vmax(_ a: F8, _ b: F8) -> F8 { a.replacing(with: b, where: b .> a) }

@inline(__always) func load8(_ p: UnsafePointer<Float>) -> F8 {
    UnsafeRawPointer(p).loadUnaligned(as: F8.self)
}

@inline(__always) func store8(_ v: F8, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: F8.self)
}

/// Loads `n` < 8 floats, the rest zero.
@inline(__always) func loadPartial(_ p: UnsafePointer<Float>, _ n: Int) -> F8 {
    var v = F8()
    for i in 0..<n { v[i] = p[i] }
    return v
}

@inline(__always) func storePartial(_ v: F8, _ p: UnsafeMutablePointer<Float>, _ n: Int) {
    for i in 0..<n { p[i] = v[i] }
}

/// e^x, Cephes' expf polynomial (about 1 ulp), exact powers of two by exponent bits.
@inline(__always) func vexp(_ x0: F8) -> F8 {
    let x = vmax(vmin(x0, F8(repeating: 88.3762626647949)), F8(repeating: -87.33654475))
    let magic = F8(repeating: 12582912.0)  // 1.5·2²³: adding it rounds to an integer
    let t = x.addingProduct(x, F8(repeating: 0.44269504088896341)) + magic  // x·log2(e) + magic, one FMA
    let n = t - magic
    var r = x.addingProduct(n, F8(repeating: -0.693359375))
    r = r.addingProduct(n, F8(repeating: 2.12194440e-4))
    var p = F8(repeating: 1.9875691500e-4)
    p = p * r + F8(repeating: 1.3981999507e-3)
    p = p * r + F8(repeating: 8.3334519073e-3)
    p = p * r + F8(repeating: 4.1665795894e-2)
    p = p * r + F8(repeating: 1.6666665459e-1)
    p = p * r + F8(repeating: 5.0000001201e-1)
    let y = (p * (r * r) + r) + 1
    let ni = unsafeBitCast(t, to: SIMD8<Int32>.self) &- unsafeBitCast(magic, to: SIMD8<Int32>.self)
    return y * unsafeBitCast((ni &+ 127) &<< 23, to: F8.self)
}

@inline(__always) func vsigmoid(_ x: F8) -> F8 { 1 / (1 + vexp(-x)) }

@inline(__always) func vsilu(_ x: F8) -> F8 { x / (1 + vexp(-x)) }

/// tanh: Cephes' odd polynomial below 0.625, 1 − 2/(e^{2x}+1) above (no cancellation there).
@inline(__always) func vtanh(_ x: F8) -> F8 {
    let ax = vmax(x, -x)
    let z = x * x
    var p = F8(repeating: -5.70498872745e-3)
    p = p * z + F8(repeating: 2.06390887954e-2)
    p = p * z + F8(repeating: -5.37397155531e-2)
    p = p * z + F8(repeating: 1.33314422036e-1)
    p = p * z + F8(repeating: -3.33332819422e-1)
    let small = x.addingProduct(x, p * z)  // x + x³·P(x²)
    let e = vexp(2 * vmin(ax, F8(repeating: 9)))
    var large = 1 - 2 / (e + 1)
    large = large.replacing(with: -large, where: x .< 0)
    return small.replacing(with: large, where: ax .>= F8(repeating: 0.625))
}

/// erf(x): Abramowitz–Stegun 7.1.26 (absolute error below 1.5e-7).
@inline(__always) func verf(_ x: F8) -> F8 {
    let ax = vmax(x, -x)
    let t = 1 / (1 + F8(repeating: 0.3275911) * ax)
    var p = F8(repeating: 1.061405429)
    p = p * t + F8(repeating: -1.453152027)
    p = p * t + F8(repeating: 1.421413741)
    p = p * t + F8(repeating: -0.284496736)
    p = p * t + F8(repeating: 0.254829592)
    let y = 1 - p * t * vexp(-ax * ax)
    return y.replacing(with: -y, where: x .< 0)
}

@inline(__always) func vgelu(_ x: F8) -> F8 { 0.5 * x * (1 + verf(x * F8(repeating: 0.70710678118654752))) }

@inline(__always) func vgeluTanh(_ x: F8) -> F8 {
    let inner = F8(repeating: 0.7978845608028654) * (x + F8(repeating: 0.044715) * x * x * x)
    return 0.5 * x * (1 + vtanh(inner))
}

@inline(__always) func vquickGelu(_ x: F8) -> F8 { x / (1 + vexp(F8(repeating: -1.702) * x)) }

@inline(__always) func vapply(_ op: UnaryOp, _ x: F8) -> F8 {
    switch op {
    case .silu: return vsilu(x)
    case .gelu: return vgelu(x)
    case .geluTanh: return vgeluTanh(x)
    case .quickGelu: return vquickGelu(x)
    case .relu: return vmax(x, F8())
    case .tanh: return vtanh(x)
    case .sigmoid: return vsigmoid(x)
    case .exp: return vexp(x)
    case .neg: return -x
    case .sqrt: return x.squareRoot()
    case .rsqrt: return 1 / x.squareRoot()
    case .square: return x * x
    case .abs: return vmax(x, -x)
    }
}

/// bfloat16: the upper 16 bits of an IEEE float32.
///
/// Conversion from float32 rounds to nearest even and maps every NaN to the quiet NaN
/// 0x7FC0, exactly as `torch.Tensor.to(torch.bfloat16)` does.
public struct BFloat16: Sendable, Hashable, CustomStringConvertible {
    public var bitPattern: UInt16

    @inlinable public init(bitPattern: UInt16) { self.bitPattern = bitPattern }

    @inlinable public init(_ value: Float) {
        let u = value.bitPattern
        if value.isNaN {
            bitPattern = 0x7FC0
        } else {
            let roundingBias = UInt32(0x7FFF) &+ ((u >> 16) & 1)
            bitPattern = UInt16(truncatingIfNeeded: (u &+ roundingBias) >> 16)
        }
    }

    @inlinable public var float: Float { Float(bitPattern: UInt32(bitPattern) << 16) }

    public var description: String { float.description }
}

extension Float {
    @inlinable public init(_ b: BFloat16) { self = b.float }
}

/// Bulk conversions between the float storage types. They are the hot path of weight
/// loading and of half-precision storage, so each is a tight loop the compiler vectorizes
/// (F16C `vcvtph2ps`/`vcvtps2ph` with `-target-cpu haswell`).
public enum FloatConversion {
    public static func float16ToFloat(_ src: UnsafePointer<Float16>, _ dst: UnsafeMutablePointer<Float>, count: Int) {
        var i = 0
        while i + 8 <= count {
            let v = UnsafeRawPointer(src + i).loadUnaligned(as: SIMD8<Float16>.self)
            UnsafeMutableRawPointer(dst + i).storeBytes(of: SIMD8<Float>(v), as: SIMD8<Float>.self)
            i += 8
        }
        while i < count { dst[i] = Float(src[i]); i += 1 }
    }

    public static func floatToFloat16(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float16>, count: Int) {
        var i = 0
        while i + 8 <= count {
            let v = UnsafeRawPointer(src + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(dst + i).storeBytes(of: SIMD8<Float16>(v), as: SIMD8<Float16>.self)
            i += 8
        }
        while i < count { dst[i] = Float16(src[i]); i += 1 }
    }

    public static func bfloat16ToFloat(_ src: UnsafePointer<UInt16>, _ dst: UnsafeMutablePointer<Float>, count: Int) {
        let d = UnsafeMutableRawPointer(dst).assumingMemoryBound(to: UInt32.self)
        var i = 0
        while i + 8 <= count {
            let v = UnsafeRawPointer(src + i).loadUnaligned(as: SIMD8<UInt16>.self)
            let w = SIMD8<UInt32>(truncatingIfNeeded: v) &<< 16
            UnsafeMutableRawPointer(d + i).storeBytes(of: w, as: SIMD8<UInt32>.self)
            i += 8
        }
        while i < count { d[i] = UInt32(src[i]) << 16; i += 1 }
    }

    public static func floatToBFloat16(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<UInt16>, count: Int) {
        let s = UnsafeRawPointer(src).assumingMemoryBound(to: UInt32.self)
        var i = 0
        while i + 8 <= count {
            let u = UnsafeRawPointer(s + i).loadUnaligned(as: SIMD8<UInt32>.self)
            let f = UnsafeRawPointer(src + i).loadUnaligned(as: SIMD8<Float>.self)
            let bias = SIMD8<UInt32>(repeating: 0x7FFF) &+ ((u &>> 16) & 1)
            var r = (u &+ bias) &>> 16
            // NaN != NaN: quiet NaN as torch writes it.
            r.replace(with: SIMD8<UInt32>(repeating: 0x7FC0), where: f .!= f)
            UnsafeMutableRawPointer(dst + i).storeBytes(of: SIMD8<UInt16>(truncatingIfNeeded: r), as: SIMD8<UInt16>.self)
            i += 8
        }
        while i < count { dst[i] = BFloat16(src[i]).bitPattern; i += 1 }
    }
}

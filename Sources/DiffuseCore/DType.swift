/// Element types a tensor can hold. Raw values are the safetensors dtype names.
public enum DType: String, Sendable, CaseIterable, CustomStringConvertible {
    case float32 = "F32"
    case float16 = "F16"
    case bfloat16 = "BF16"
    case float64 = "F64"
    case int8 = "I8"
    case uint8 = "U8"
    case int32 = "I32"
    case int64 = "I64"
    case bool = "BOOL"

    /// Bytes per element.
    @inlinable public var size: Int {
        switch self {
        case .float32, .int32: return 4
        case .float16, .bfloat16: return 2
        case .float64, .int64: return 8
        case .int8, .uint8, .bool: return 1
        }
    }

    public var isFloatingPoint: Bool {
        switch self {
        case .float32, .float16, .bfloat16, .float64: return true
        default: return false
        }
    }

    /// The names users and configs write (`"fp16"`, `"float16"`, `"bf16"`, ...).
    public init?(name: String) {
        switch name.lowercased() {
        case "f32", "fp32", "float32", "float": self = .float32
        case "f16", "fp16", "float16", "half": self = .float16
        case "bf16", "bfloat16": self = .bfloat16
        case "f64", "fp64", "float64", "double": self = .float64
        case "i8", "int8": self = .int8
        case "u8", "uint8": self = .uint8
        case "i32", "int32": self = .int32
        case "i64", "int64": self = .int64
        case "bool": self = .bool
        default: return nil
        }
    }

    public var description: String {
        switch self {
        case .float32: return "float32"
        case .float16: return "float16"
        case .bfloat16: return "bfloat16"
        case .float64: return "float64"
        case .int8: return "int8"
        case .uint8: return "uint8"
        case .int32: return "int32"
        case .int64: return "int64"
        case .bool: return "bool"
        }
    }
}

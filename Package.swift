// swift-tools-version:6.0
import PackageDescription

// Release builds target Haswell (AVX2, FMA, F16C): Float16 conversions become single F16C
// instructions (~12x faster) and Swift SIMD code compiles to AVX2.
let fast: [SwiftSetting] = [
    .unsafeFlags(["-target-cpu", "haswell"]),
    .unsafeFlags(["-Ounchecked", "-wmo"], .when(configuration: .release)),
]

let package = Package(
    name: "Diffuse",
    products: [
        .executable(name: "diffuse", targets: ["diffuse"]),
        .library(name: "Diffuse", targets: ["DiffusePipelines"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // System libraries: oneDNN (CPU conv/matmul), zlib (PNG, .gz vocabularies), and libgomp
        // (oneDNN's OpenMP pool, which the Swift kernels share).
        .systemLibrary(name: "CDNNL", path: "Sources/CDNNL"),
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        .systemLibrary(name: "CGOMP", path: "Sources/CGOMP"),

        // Tensors, dtypes, safetensors, JSON, images, threading: no knowledge of models.
        .target(name: "DiffuseCore", dependencies: ["CZlib", "CGOMP"], swiftSettings: fast),
        // The op graph: builder, passes, memory planner, and the backend protocol.
        .target(name: "DiffuseGraph", dependencies: ["DiffuseCore"], swiftSettings: fast),
        // CPU backend: oneDNN for conv/matmul, Swift SIMD kernels for the rest.
        .target(name: "DiffuseCPU", dependencies: ["DiffuseGraph", "CDNNL"], swiftSettings: fast),
        // CUDA backend: driver API, cuBLASLt and NVRTC, all loaded with dlopen.
        .target(name: "DiffuseCUDA", dependencies: ["DiffuseGraph"], swiftSettings: fast),
        // CLIP BPE tokenizer.
        .target(name: "DiffuseTokenizer", dependencies: ["DiffuseCore"], swiftSettings: fast),
        // Schedulers (host Float64 scalars, latent updates as backend ops) and torch-compatible RNG.
        .target(name: "DiffuseSchedulers", dependencies: ["DiffuseGraph"], swiftSettings: fast),
        // CLIP text encoders, UNet2DConditionModel, AutoencoderKL, AutoencoderTiny.
        .target(name: "DiffuseModels", dependencies: ["DiffuseGraph"], swiftSettings: fast),
        // Data linked into the binary with `.incbin` (CLIP's BPE vocabulary for single-file checkpoints).
        .target(name: "CDiffuseResources",
                exclude: ["bpe_simple_vocab_16e6.txt.gz", "LICENSE.openai_CLIP"],
                cSettings: [.headerSearchPath(".")]),
        // Pipelines, model sources (folders, HF cache, single files), backends selection.
        .target(name: "DiffusePipelines",
                dependencies: ["DiffuseModels", "DiffuseTokenizer", "DiffuseSchedulers", "DiffuseCPU", "DiffuseCUDA",
                               "CDiffuseResources"],
                swiftSettings: fast),
        .executableTarget(name: "diffuse",
                          dependencies: ["DiffusePipelines", .product(name: "ArgumentParser", package: "swift-argument-parser")],
                          swiftSettings: fast),

        .testTarget(name: "DiffuseCoreTests", dependencies: ["DiffuseCore"], exclude: ["Fixtures"], swiftSettings: fast),
        .testTarget(name: "DiffuseCPUTests", dependencies: ["DiffuseCPU"], swiftSettings: fast),
        .testTarget(name: "DiffuseTokenizerTests", dependencies: ["DiffuseTokenizer"], swiftSettings: fast),
        .testTarget(name: "DiffuseSchedulersTests", dependencies: ["DiffuseSchedulers"], exclude: ["Fixtures"], swiftSettings: fast),
        .testTarget(name: "DiffuseModelsTests", dependencies: ["DiffuseModels", "DiffuseCPU", "DiffuseSchedulers"], exclude: ["Fixtures"],
                    swiftSettings: fast),
        // Depends on the executable so `swift test` builds it: the CLI tests run the real binary.
        .testTarget(name: "DiffusePipelinesTests", dependencies: ["DiffusePipelines", "diffuse", "DiffuseModels", "DiffuseTokenizer"],
                    exclude: ["Fixtures"], swiftSettings: fast),
        .testTarget(name: "DiffuseCUDATests", dependencies: ["DiffuseCUDA", "DiffuseModels"], swiftSettings: fast),
    ],
    swiftLanguageModes: [.v5]
)

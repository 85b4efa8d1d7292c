// swift-tools-version:5.9
import PackageDescription

let package = Package(
    name: "StableDiffusion",
    platforms: [.macOS(.v13), .iOS(.v16)],
    products: [
        .library(name: "StableDiffusion", targets: ["StableDiffusion"]),
        .executable(name: "StableDiffusionCLI", targets: ["StableDiffusionCLI"]),
    ],
    targets: [
        .target(name: "StableDiffusion", path: "Sources/StableDiffusion"),
        .executableTarget(
            name: "StableDiffusionCLI",
            dependencies: ["StableDiffusion"],
            path: "Sources/StableDiffusionCLI"),
        // Test-only code (the closed-form models), kept out of the library product.
        .target(name: "StableDiffusionTestSupport", dependencies: ["StableDiffusion"], path: "Tests/TestSupport"),
        .testTarget(
            name: "StableDiffusionTests",
            // The CLI is a dependency so `swift test` builds the binary that CLITests run.
            dependencies: ["StableDiffusion", "StableDiffusionCLI", "StableDiffusionTestSupport"],
            path: "Tests/StableDiffusionTests",
            // Tests read golden.json by file path (see GoldenVectors.swift), so no resource bundle is needed.
            exclude: ["Resources"]),
    ]
)

#if os(Linux)
// Linux has no Core ML, so the library leaves its Core ML wrappers out there (`#if canImport(CoreML)`).
// CoreMLTypeCheck compiles those same files (symlinks) against CoreMLStandIn, a module named CoreML
// that declares exactly the members they use with Apple's signatures: `swift build` then fails on a
// misspelled or mistyped Core ML call. Neither target is in a product; nothing of them runs. On
// Apple platforms the real Core ML compiles the wrappers inside the library instead.
package.targets += [
    .target(name: "CoreML", path: "Tests/CoreMLStandIn"),
    .target(name: "CoreGraphics", path: "Tests/CoreGraphicsStandIn"),
    .target(name: "ImageIO", dependencies: ["CoreGraphics"], path: "Tests/ImageIOStandIn"),
    // Also the CLI's Core ML path and ImageFile (CoreGraphics, ImageIO stand-ins likewise).
    .target(name: "CoreMLTypeCheck", dependencies: ["StableDiffusion", "CoreML", "CoreGraphics", "ImageIO"],
            path: "Tests/CoreMLTypeCheck",
            swiftSettings: [.define("COREML_STAND_IN")]),
]
package.targets.first { $0.name == "StableDiffusionTests" }!.dependencies.append("CoreMLTypeCheck")
#endif

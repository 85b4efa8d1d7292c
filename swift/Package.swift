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
        .testTarget(
            name: "StableDiffusionTests",
            // The CLI is a dependency so `swift test` builds the binary that CLITests run.
            dependencies: ["StableDiffusion", "StableDiffusionCLI"],
            path: "Tests/StableDiffusionTests",
            // Tests read golden.json by file path (see GoldenVectors.swift), so no resource bundle is needed.
            exclude: ["Resources"]),
    ]
)

// On Linux only the CoreMLTypeCheck target compiles this file, against stand-ins (Package.swift).
#if canImport(CoreGraphics) && canImport(ImageIO) && (!os(Linux) || COREML_STAND_IN)
import CoreGraphics
import Foundation
import ImageIO

/// Reads an image file with ImageIO, redrawn at the model's size as 8-bit RGB: img2img's start image, a mask, a
/// ControlNet's condition image.
public enum ImageFile {
    /// (1, 3, H, W) in [-1, 1].
    public static func read(path: String, shape latentShape: [Int]) throws -> Tensor {
        try rgb(path: path, shape: latentShape, flag: "--image").tensor()
    }

    /// (1, 3, H, W) in [0, 1]: a --controlnet-inputs image.
    /// An image of another aspect ratio than the generated ones is refused (PipelineSettings.checkConditionAspect).
    public static func readCondition(path: String, shape latentShape: [Int]) throws -> Tensor {
        try rgb(path: path, shape: latentShape, flag: "--controlnet-inputs", sameAspect: true).unitTensor()
    }

    /// The inpaint ControlNet's image in [0, 1] (the --image, already checked against the mask's size).
    public static func readUnit(path: String, shape latentShape: [Int]) throws -> Tensor {
        try rgb(path: path, shape: latentShape, flag: "--image").unitTensor()
    }

    /// (1, 1, H, W) in [0, 1]: a --mask, grey as PIL's convert("L") makes it (ITU-R 601-2 luma, rounded).
    public static func readMask(path: String, shape latentShape: [Int]) throws -> Tensor {
        let image = try rgb(path: path, shape: latentShape, flag: "--mask")
        let grey = (0..<(image.width * image.height)).map { p -> Float in
            let (r, g, b) = (Int(image.bytes[3 * p]), Int(image.bytes[3 * p + 1]), Int(image.bytes[3 * p + 2]))
            return Float((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) / 255
        }
        return Tensor(shape: [1, 1, image.height, image.width], scalars: grey)
    }

    /// (width, height) in pixels of an image ImageIO reads (any format); nil for anything else.
    public static func size(path: String) -> (width: Int, height: Int)? {
        cgImage(path: path).map { ($0.width, $0.height) }
    }

    static func cgImage(path: String) -> CGImage? {
        guard let source = CGImageSourceCreateWithURL(URL(fileURLWithPath: path) as CFURL, nil) else { return nil }
        return CGImageSourceCreateImageAtIndex(source, 0, nil)
    }

    static func rgb(path: String, shape latentShape: [Int], flag: String, sameAspect: Bool = false) throws -> RGBImage {
        let width = latentShape[3] * 8, height = latentShape[2] * 8
        guard let image = cgImage(path: path) else { throw UsageError("\(flag) \(path) is not an image ImageIO can read") }
        if sameAspect {
            try PipelineSettings.checkConditionAspect(path: path, width: image.width, height: image.height, imageWidth: width,
                                                      imageHeight: height)
        }
        var rgba = [UInt8](repeating: 0, count: width * height * 4)
        let drawn: Bool = rgba.withUnsafeMutableBytes { buffer in
            guard let context = CGContext(data: buffer.baseAddress, width: width, height: height, bitsPerComponent: 8,
                                          bytesPerRow: width * 4, space: CGColorSpaceCreateDeviceRGB(),
                                          bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue) else { return false }
            context.draw(image, in: CGRect(x: 0, y: 0, width: width, height: height))
            return true
        }
        guard drawn else { throw UsageError("\(flag) \(path) could not be redrawn at \(width)x\(height)") }
        var rgb = [UInt8]()
        rgb.reserveCapacity(width * height * 3)
        for pixel in 0..<(width * height) { rgb += rgba[(pixel * 4)..<(pixel * 4 + 3)] }
        return RGBImage(width: width, height: height, bytes: rgb)
    }
}
#endif

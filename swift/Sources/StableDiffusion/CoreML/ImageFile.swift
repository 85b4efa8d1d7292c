// On Linux only the CoreMLTypeCheck target compiles this file, against stand-ins (Package.swift).
#if canImport(CoreGraphics) && canImport(ImageIO) && (!os(Linux) || COREML_STAND_IN)
import CoreGraphics
import Foundation
import ImageIO

/// Reads an image file for img2img with ImageIO, redrawn at the model's size as 8-bit RGB.
public enum ImageFile {
    public static func read(path: String, shape latentShape: [Int]) throws -> Tensor {
        let width = latentShape[3] * 8, height = latentShape[2] * 8
        guard let source = CGImageSourceCreateWithURL(URL(fileURLWithPath: path) as CFURL, nil),
              let image = CGImageSourceCreateImageAtIndex(source, 0, nil) else {
            throw UsageError("--image \(path) is not an image ImageIO can read")
        }
        var rgba = [UInt8](repeating: 0, count: width * height * 4)
        let drawn: Bool = rgba.withUnsafeMutableBytes { buffer in
            guard let context = CGContext(data: buffer.baseAddress, width: width, height: height, bitsPerComponent: 8,
                                          bytesPerRow: width * 4, space: CGColorSpaceCreateDeviceRGB(),
                                          bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue) else { return false }
            context.draw(image, in: CGRect(x: 0, y: 0, width: width, height: height))
            return true
        }
        guard drawn else { throw UsageError("--image \(path) could not be redrawn at \(width)x\(height)") }
        var rgb = [UInt8]()
        rgb.reserveCapacity(width * height * 3)
        for pixel in 0..<(width * height) { rgb += rgba[(pixel * 4)..<(pixel * 4 + 3)] }
        return RGBImage(width: width, height: height, bytes: rgb).tensor()
    }
}
#endif

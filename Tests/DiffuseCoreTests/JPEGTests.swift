import DiffuseCore
import Testing

@Suite("JPEG")
struct JPEGTests {
    /// Baseline, progressive, every sampling, restarts, RGB, non-interleaved, tiny: the pixels
    /// Pillow (libjpeg-turbo) decodes, within the manifest's tolerance.
    @Test("JPEGs from Pillow and cjpeg decode to what Pillow decodes")
    func againstPillow() throws {
        let cases = ImageFixtures.cases("jpeg")
        #expect(cases.count >= 10)
        #expect(cases.contains { $0["progressive"]?.bool == true })
        for c in cases {
            let file = c["file"]!.string!
            let decoded = try ImageFile.read(ImageFixtures.path(file))
            #expect(decoded.format == .jpeg)
            let expected = try ImageFixtures.image(c["expected"]!.string!)
            let diff = maxDifference(decoded.image, expected)
            #expect(diff != nil && diff! <= c["tolerance"]!.int!,
                    "\(file): max difference \(diff.map(String.init) ?? "shape mismatch") vs \(ImageFixtures.manifest["reference_decoder"]!.string!)")
        }
    }

    @Test("Image.load applies the EXIF orientation of a phone-style JPEG")
    func orientation() throws {
        for c in ImageFixtures.cases("load") where c["file"]!.string!.hasSuffix(".jpg") {
            let path = ImageFixtures.path(c["file"]!.string!)
            #expect(try ImageFile.read(path).exifOrientation == c["orientation"]!.int!)
            let loaded = try Image.load(path)
            let expected = try ImageFixtures.image(c["expected"]!.string!)
            #expect(loaded.width == expected.width && loaded.height == expected.height)
            #expect(maxDifference(loaded, expected) == 0)
        }
    }

    @Test("a synthetic baseline file decodes to flat gray, with and without restart markers")
    func synthetic() throws {
        let flat = try JPEG.decode(TestJPEG.flatGray(width: 11, height: 9), name: "flat.jpg").image
        #expect(flat.width == 11 && flat.height == 9 && flat.channels == 1)
        #expect(flat.pixels.allSatisfy { $0 == 128 })
        // Four blocks, a restart marker after every block.
        let rst = TestJPEG.bitsToBytes("00") + [0xFF, 0xD0] + TestJPEG.bitsToBytes("00") + [0xFF, 0xD1]
            + TestJPEG.bitsToBytes("00") + [0xFF, 0xD2] + TestJPEG.bitsToBytes("00")
        let restarted = try JPEG.decode(TestJPEG.flatGray(width: 16, height: 16, restartInterval: 1, entropy: rst), name: "rst.jpg")
        #expect(restarted.image.pixels.allSatisfy { $0 == 128 })
    }

    @Test("malformed and unsupported JPEGs: each problem has its own error naming the file")
    func malformed() throws {
        let name = "bad.jpg"
        func problem(_ bytes: [UInt8]) -> ImageError.Problem? {
            let e = imageError { try ImageFile.decode(bytes, name: name) }
            #expect(e?.file == name)
            #expect(e?.description.hasPrefix(name + ": ") == true)
            return e?.problem
        }
        // Bad Huffman code: a "1" bit where the only DC code is "0".
        #expect(problem(TestJPEG.flatGray(entropy: [0x80])) == .corrupt("bad Huffman data in scan 1, MCU 0"))
        // Entropy data ending early: four blocks' worth of bits for six blocks, then EOI.
        #expect(problem(TestJPEG.flatGray(width: 16, height: 24, entropy: [0x00]))
                == .corrupt("the entropy-coded data of scan 1 ends early, at MCU 4 of 6"))
        // Truncated inside the scan (no EOI) and right after it.
        #expect(problem(TestJPEG.flatGray(width: 64, height: 64, entropy: [0, 0], eoi: false))
                == .truncated("the entropy-coded data of scan 1 ends at MCU 8 of 64"))
        #expect(problem(TestJPEG.flatGray(eoi: false)) == .truncated("the file ends before the end-of-image marker"))
        // A missing restart marker.
        #expect(problem(TestJPEG.flatGray(width: 16, height: 8, restartInterval: 1, entropy: [0x00, 0x00]))
                == .corrupt("expected a restart marker in scan 1 at MCU 1, found 0xFFD9"))
        // Unsupported features, each named.
        #expect(problem(TestJPEG.flatGray(sof: 0xC9)) == .unsupported("arithmetic-coded JPEG (SOF9)"))
        #expect(problem(TestJPEG.flatGray(sof: 0xC3)) == .unsupported("lossless JPEG (SOF3)"))
        #expect(problem(TestJPEG.flatGray(precision: 12)) == .unsupported("12-bit samples (only 8-bit JPEG is supported)"))
        #expect(problem(TestJPEG.flatGray(height: 0)) == .unsupported("image height 0 (defined later by a DNL marker)"))
        #expect(problem(TestJPEG.flatGray(components: [(1, 0x11), (2, 0x11), (3, 0x11), (4, 0x11)]))
                == .unsupported("4-component (CMYK/YCCK) JPEG"))
        #expect(problem(TestJPEG.flatGray(components: [(1, 0x31), (2, 0x21), (3, 0x11)]))
                == .unsupported("fractional sampling factors (component 2 is 2x1, the maximum 3x1)"))
        // Structure: a scan naming a component the frame lacks; huge dimensions; no SOI.
        #expect(problem(TestJPEG.flatGray(scanComponents: [7])) == .corrupt("scan 1 names component 7, which the frame does not have"))
        #expect(problem(TestJPEG.flatGray(width: 65535, height: 65535, entropy: [])) == .tooLarge(width: 65535, height: 65535))
        #expect(problem([0xFF, 0xD8, 0xFF, 0xD9]) == .corrupt("no image frame (SOF marker) before the end of the image"))
        #expect(problem([0xFF, 0xD8]) == .truncated("the file ends after the JPEG start-of-image marker"))
        // A real encoder's arithmetic-coded file.
        for c in ImageFixtures.cases("unsupported") {
            let bytes = try Files.read(ImageFixtures.path(c["file"]!.string!))
            guard case .unsupported(let what)? = problem(bytes) else { Issue.record("\(c["file"]!.string!) was not rejected"); continue }
            #expect(what.contains(c["problem"]!.string!))
        }
        // A progressive first scan must be a DC scan (Se = 0); this one asks for Ss=0..Se=63.
        #expect(problem(TestJPEG.flatGray(sof: 0xC2)) == .corrupt("invalid progressive parameters in scan 1 (Ss=0 Se=63 Ah=0 Al=0)"))
    }

    @Test("truncated and corrupted copies of real JPEGs never crash: an error naming the file, or an image of the right size")
    func fuzz() throws {
        var rng = TestRandom(seed: 77)
        for c in ImageFixtures.cases("jpeg") {
            let file = c["file"]!.string!
            let bytes = try Files.read(ImageFixtures.path(file))
            let reference = try JPEG.decode(bytes, name: file).image
            for cut in stride(from: 0, to: bytes.count - 2, by: max(1, bytes.count / 149)) {
                #expect(imageError { try ImageFile.decode(Array(bytes.prefix(cut)), name: file) }?.file == file)
            }
            // Find the first scan's data, so that half of the corruptions hit entropy-coded data.
            let sos = bytes.indices.first { bytes[$0] == 0xFF && bytes[$0 + 1] == 0xDA }!
            for trial in 0..<80 {
                var bad = bytes
                let lower = trial % 2 == 0 ? 2 : sos
                for _ in 0..<(1 + rng.below(3)) { bad[lower + rng.below(bad.count - 2 - lower)] = rng.byte() }
                do {
                    let image = try ImageFile.decode(bad, name: file).image
                    if trial % 2 == 1 { #expect(image.width == reference.width && image.height == reference.height) }
                } catch let e as ImageError {
                    #expect(e.file == file)
                }
            }
        }
    }
}

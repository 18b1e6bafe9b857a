import DiffuseCore
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A scratch directory for files the tests write, removed afterwards.
private func withTemporaryDirectory<T>(_ body: (String) throws -> T) throws -> T {
    var template = Array("/tmp/diffuse-image-tests-XXXXXX".utf8CString)
    guard let dir = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }).map({ String(cString: $0) }) else {
        throw FileError("/tmp", "cannot create a temporary directory")
    }
    defer {
        for name in (try? Files.list(dir)) ?? [] { unlink(Files.join(dir, name)) }
        rmdir(dir)
    }
    return try body(dir)
}

private func randomImage(width: Int, height: Int, channels: Int, seed: UInt64) -> Image {
    var rng = TestRandom(seed: seed)
    // Smooth ramps plus noise, so every filter type wins somewhere.
    var px: [UInt8] = []
    for y in 0..<height {
        for x in 0..<width {
            for c in 0..<channels { px.append(UInt8(truncatingIfNeeded: x * 7 + y * 3 + c * 50 + rng.below(9))) }
        }
    }
    return Image(width: width, height: height, channels: channels, pixels: px)
}

@Suite("PNG")
struct PNGTests {
    @Test("write then read gives identical pixels and text chunks (Latin-1 and not)", arguments: [1, 2, 3, 4])
    func roundTrip(channels: Int) throws {
        let image = randomImage(width: 37, height: 23, channels: channels, seed: UInt64(channels))
        let text = [
            ("parameters", "a cat on a mat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42"),
            ("Latin", "caf\u{e9} \u{bd} \u{ff}"),
            ("prompt", "\u{732B}\u{306E}\u{5199}\u{771F} \u{1F431} na\u{EF}ve \u{2014} Zo\u{eb}"),
            ("empty", ""),
        ]
        try withTemporaryDirectory { dir in
            let path = Files.join(dir, "out.png")
            try image.writePNG(path, text: text)
            let file = try ImageFile.read(path)
            #expect(file.format == .png)
            #expect(file.image == image)
            #expect(file.text.map(\.key) == text.map(\.0))
            #expect(file.text.map(\.value) == text.map(\.1))
            #expect(file.text("prompt") == text[2].1)
        }
    }

    @Test("text chunks are written as PIL's add_text writes them: tEXt if Latin-1, else iTXt")
    func textChunkKinds() throws {
        let png = try PNG.encode(Image(width: 1, height: 1, channels: 3), text: [("a", "caf\u{e9}"), ("b", "\u{732B}")])
        // Walk the chunks: type and body.
        var chunks: [(String, [UInt8])] = []
        var pos = 8
        while pos < png.count {
            let n = Int(png[pos]) << 24 | Int(png[pos + 1]) << 16 | Int(png[pos + 2]) << 8 | Int(png[pos + 3])
            chunks.append((String(decoding: png[(pos + 4)..<(pos + 8)], as: UTF8.self), Array(png[(pos + 8)..<(pos + 8 + n)])))
            pos += 12 + n
        }
        #expect(chunks.map(\.0) == ["IHDR", "tEXt", "iTXt", "IDAT", "IEND"])
        #expect(chunks[1].1 == [0x61, 0, 0x63, 0x61, 0x66, 0xE9])                       // Latin-1 byte E9
        #expect(chunks[2].1 == [0x62, 0, 0, 0, 0, 0] + Array("\u{732B}".utf8))      // uncompressed, no language
    }

    @Test("the writer refuses bad keywords and NUL in text, naming the file")
    func badText() throws {
        let image = Image(width: 2, height: 2, channels: 3)
        for key in ["", String(repeating: "k", count: 80), " lead", "trail ", "two  spaces", "\u{732B}"] {
            let e = imageError { try image.writePNG("/tmp/never-written.png", text: [(key, "v")]) }
            #expect(e?.description.hasPrefix("/tmp/never-written.png: PNG text keyword") == true, "\(key)")
        }
        let e = imageError { try PNG.encode(image, text: [("k", "a\u{0}b")]) }
        #expect(e?.description.contains("NUL") == true)
        #expect(!Files.exists("/tmp/never-written.png"))
        #expect(imageError { try PNG.encode(Image(width: 0, height: 3, channels: 3)) } != nil)
    }

    @Test("writePNG never replaces an existing file unless asked")
    func overwrite() throws {
        try withTemporaryDirectory { dir in
            let path = Files.join(dir, "x.png")
            let a = randomImage(width: 3, height: 2, channels: 3, seed: 1), b = randomImage(width: 3, height: 2, channels: 3, seed: 2)
            try a.writePNG(path)
            #expect(throws: FileError.self) { try b.writePNG(path) }
            #expect(try Image.read(path) == a)
            try b.writePNG(path, overwrite: true)
            #expect(try Image.read(path) == b)
        }
    }

    /// Every colour type and bit depth, interlaced or not, with all five filters and split
    /// IDAT data, written by the independent test writer.
    @Test("every colour type, bit depth, filter and Adam7", arguments: [
        (0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8), (4, 8), (4, 16), (6, 8), (6, 16),
    ])
    func colourTypes(colorType: Int, bitDepth: Int) throws {
        var rng = TestRandom(seed: UInt64(colorType * 100 + bitDepth))
        for (width, height) in [(1, 1), (3, 2), (13, 11), (33, 9)] {
            for interlaced in [false, true] {
                let spp = [1, 0, 3, 1, 2, 0, 4][colorType]
                let maxValue = (1 << bitDepth) - 1
                var png = TestPNG(width: width, height: height, colorType: colorType, bitDepth: bitDepth,
                                  interlaced: interlaced, samples: (0..<(width * height * spp)).map { _ in rng.below(maxValue + 1) })
                if colorType == 3 {
                    let entries = min(maxValue + 1, 200)
                    png.palette = rng.bytes(3 * entries)
                    if entries <= maxValue { png.samples = png.samples.map { $0 % (entries + 1) } }   // one past the palette: black
                    png.trns = rng.bytes(entries / 2)
                }
                let image = try PNG.decode(try png.encode(), name: "generated.png").image
                #expect(image == png.expectedImage(), "colour type \(colorType), depth \(bitDepth), \(width)x\(height), interlaced \(interlaced)")
            }
        }
    }

    @Test("a tRNS colour key on gray and RGB becomes alpha", arguments: [(0, 8), (0, 2), (0, 16), (2, 8), (2, 16)])
    func colourKey(colorType: Int, bitDepth: Int) throws {
        let spp = colorType == 0 ? 1 : 3
        var rng = TestRandom(seed: 7)
        let maxValue = (1 << bitDepth) - 1
        var samples = (0..<(9 * 5 * spp)).map { _ in rng.below(maxValue + 1) }
        let key = Array(samples[0..<spp])
        for p in stride(from: 0, to: samples.count, by: 4 * spp) { samples.replaceSubrange(p..<(p + spp), with: key) }
        var png = TestPNG(width: 9, height: 5, colorType: colorType, bitDepth: bitDepth, samples: samples)
        png.trns = key.flatMap { [UInt8($0 >> 8), UInt8($0 & 255)] }
        let image = try PNG.decode(try png.encode(), name: "key.png").image
        #expect(image.channels == spp + 1)
        #expect(image == png.expectedImage())
        #expect(image.pixels.enumerated().filter { ($0.offset + 1) % (spp + 1) == 0 && $0.element == 0 }.count >= 12)
    }

    @Test("PNGs written by Pillow and libpng decode to what Pillow decodes")
    func otherEncoders() throws {
        let cases = ImageFixtures.cases("png")
        #expect(cases.count >= 15)
        var seen = Set<String>()
        for c in cases {
            let file = c["file"]!.string!
            let decoded = try ImageFile.read(ImageFixtures.path(file))
            let expected = try ImageFixtures.image(c["expected"]!.string!)
            #expect(decoded.image == expected, "\(file) (\(c["encoder"]!.string!))")
            if let text = c["text"]?.array {
                #expect(decoded.text.map(\.key) == text.map { $0.array![0].string! }, "\(file)")
                #expect(decoded.text.map(\.value) == text.map { $0.array![1].string! }, "\(file)")
            }
            seen.insert("\(c["color_type"]!.int!)/\(c["interlaced"]!.bool!)")
        }
        // The fixture set covers every colour type, with and without interlacing somewhere.
        #expect(Set(["0", "2", "3", "4", "6"]).isSubset(of: Set(seen.map { String($0.prefix(1)) })))
        #expect(seen.contains { $0.hasSuffix("true") })
    }

    @Test("Image.load turns PNGs upright by their eXIf orientation, as exif_transpose does")
    func orientation() throws {
        for c in ImageFixtures.cases("load") {
            let file = c["file"]!.string!
            let loaded = try Image.load(ImageFixtures.path(file))
            #expect(loaded == (try ImageFixtures.image(c["expected"]!.string!)), "\(file)")
            #expect(try ImageFile.read(ImageFixtures.path(file)).exifOrientation == c["orientation"]!.int!)
        }
    }

    @Test("the decoder is chosen by signature, not by file name")
    func signature() throws {
        try withTemporaryDirectory { dir in
            let png = Files.join(dir, "really-a-png.jpg")
            let image = randomImage(width: 4, height: 3, channels: 3, seed: 9)
            try image.writePNG(png)
            let file = try ImageFile.read(png)
            #expect(file.format == .png && file.image == image)
            let jpegBytes = try Files.read(ImageFixtures.path(ImageFixtures.cases("jpeg")[0]["file"]!.string!))
            let jpeg = Files.join(dir, "really-a-jpeg.png")
            try Files.write(jpegBytes, to: jpeg)
            #expect(try ImageFile.read(jpeg).format == .jpeg)
        }
    }

    // MARK: Malformed files

    /// A valid test PNG whose chunks the malformed cases edit.
    private func sample() throws -> TestPNG {
        TestPNG(width: 5, height: 4, colorType: 2, bitDepth: 8, samples: (0..<60).map { $0 * 4 })
    }

    private func chunks(_ png: [UInt8]) -> [(type: String, range: Range<Int>)] {
        var out: [(String, Range<Int>)] = []
        var pos = 8
        while pos + 8 <= png.count {
            let n = Int(png[pos]) << 24 | Int(png[pos + 1]) << 16 | Int(png[pos + 2]) << 8 | Int(png[pos + 3])
            out.append((String(decoding: png[(pos + 4)..<(pos + 8)], as: UTF8.self), pos..<(pos + 12 + n)))
            pos += 12 + n
        }
        return out
    }

    @Test("malformed PNGs: each problem has its own error naming the file")
    func malformed() throws {
        let good = try sample().encode()
        let name = "bad.png"
        func problem(_ bytes: [UInt8]) -> ImageError.Problem? {
            let e = imageError { try ImageFile.decode(bytes, name: name) }
            #expect(e?.file == name)
            #expect(e?.description.hasPrefix(name + ": ") == true)
            return e?.problem
        }
        let idat = chunks(good).first { $0.type == "IDAT" }!.range

        // Bad signature; text; empty; cut inside the signature.
        #expect(problem([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x00] + good.dropFirst(8)) == .notAnImage("unknown signature 89 50 4E 47 0D 0A 1A 00"))
        #expect(problem(Array("hello, world".utf8)) == .notAnImage("unknown signature 68 65 6C 6C 6F 2C 20 77"))
        #expect(problem(Array("GIF89a...".utf8)) == .notAnImage("a GIF file"))
        #expect(problem([]) == .truncated("the file is empty"))
        #expect(problem(Array(good.prefix(5))) == .truncated("the file ends inside the PNG signature"))

        // Bad CRC: one flipped bit of image data.
        var flipped = good
        flipped[idat.lowerBound + 9] ^= 0x10
        guard case .badCRC(chunk: "IDAT", _, _)? = problem(flipped) else { Issue.record("expected an IDAT CRC error"); return }

        // Truncated inside a chunk, and without IEND.
        guard case .truncated(let t1)? = problem(Array(good.prefix(idat.lowerBound + 10))) else { Issue.record("truncated IDAT"); return }
        #expect(t1.contains("IDAT"))
        #expect(problem(Array(good.dropLast(12))) == .truncated("the file ends without an IEND chunk"))

        // Structure: no IHDR first, unknown critical chunk, bad colour type / depth, palette without PLTE.
        var png = try sample()
        png.extraChunks = [("ABCD", [1, 2, 3])]
        #expect(problem(try png.encode()) == .unsupported("unknown critical chunk 'ABCD'"))
        png.extraChunks = [("abCD", [1, 2, 3])]   // ancillary: skipped
        #expect(try PNG.decode(try png.encode(), name: name).image == (try sample()).expectedImage())
        var header = try sample()
        header.bitDepth = 4   // RGB must be 8 or 16 bits
        header.samples = header.samples.map { $0 % 16 }
        #expect(problem(try header.encode()) == .corrupt("bit depth 4 is not allowed for colour type 2"))
        var noPalette = try sample()
        noPalette.colorType = 3
        noPalette.samples = Array(noPalette.samples.prefix(20)).map { $0 % 4 }
        #expect(problem(try noPalette.encode()) == .corrupt("palette image without a PLTE chunk"))
        var iend = Array(good[0..<8]) + TestPNG.chunk("IEND", [])
        #expect(problem(iend) == .corrupt("the first chunk is 'IEND', not IHDR"))
        iend = Array(good[0..<idat.lowerBound]) + TestPNG.chunk("IEND", [])
        #expect(problem(iend) == .corrupt("no image data (IDAT) before IEND"))

        // Filter type out of range.
        var badFilter = try sample()
        badFilter.filters = [0, 7]
        #expect(problem(try badFilter.encode()) == .corrupt("invalid filter type 7 in row 1"))

        // Compressed data that is not zlib, and zlib data too short for the image.
        var notZlib = Array(good[0..<idat.lowerBound]) + TestPNG.chunk("IDAT", [0x78, 0x9C, 0xFF, 0xFF, 0xFF]) + TestPNG.chunk("IEND", [])
        guard case .corrupt(let z)? = problem(notZlib) else { Issue.record("expected corrupt image data"); return }
        #expect(z.hasPrefix("image data (IDAT): "))
        notZlib = Array(good[0..<idat.lowerBound]) + TestPNG.chunk("IDAT", try Zlib.deflate([0, 1, 2])) + TestPNG.chunk("IEND", [])
        #expect(problem(notZlib) == .truncated("image data inflates to 3 bytes, expected 64"))

        // Decompression bomb dimensions.
        let huge = Array(good[0..<8]) + TestPNG.chunk("IHDR", TestPNG.be32(100_000) + TestPNG.be32(100_000) + [8, 2, 0, 0, 0])
        #expect(problem(huge) == .tooLarge(width: 100_000, height: 100_000))

        // Text chunks: no keyword terminator; iTXt that is not UTF-8.
        var text = try sample()
        text.extraChunks = [("tEXt", Array("no terminator".utf8))]
        #expect(problem(try text.encode()) == .corrupt("tEXt chunk without a keyword terminator"))
        text.extraChunks = [("iTXt", Array("key".utf8) + [0, 0, 0, 0, 0, 0xC3, 0x28])]
        #expect(problem(try text.encode()) == .corrupt("iTXt 'key' is not valid UTF-8"))
    }

    @Test("truncated and corrupted copies of real PNGs never crash: an error naming the file, or an image")
    func fuzz() throws {
        var rng = TestRandom(seed: 2024)
        for c in ImageFixtures.cases("png") {
            let file = c["file"]!.string!
            let bytes = try Files.read(ImageFixtures.path(file))
            let reference = try PNG.decode(bytes, name: file).image
            for cut in stride(from: 0, to: bytes.count, by: max(1, bytes.count / 97)) {
                #expect(imageError { try ImageFile.decode(Array(bytes.prefix(cut)), name: file) } != nil)
            }
            let idat = chunks(bytes).filter { $0.type == "IDAT" || $0.type == "IHDR" }
            for trial in 0..<80 {
                var bad = bytes
                var sizeMayChange = false
                if trial % 2 == 0 {
                    for _ in 0..<(1 + rng.below(3)) { bad[8 + rng.below(bad.count - 8)] = rng.byte() }
                } else {
                    // Corrupt the header or image data and fix the CRC, to reach the decoder proper.
                    let pick = idat[rng.below(idat.count)]
                    let chunk = pick.range
                    guard chunk.count > 12 else { continue }
                    sizeMayChange = pick.type == "IHDR"
                    bad[chunk.lowerBound + 8 + rng.below(chunk.count - 12)] = rng.byte()
                    let body = Array(bad[(chunk.lowerBound + 4)..<(chunk.upperBound - 4)])
                    bad.replaceSubrange((chunk.upperBound - 4)..<chunk.upperBound, with: TestPNG.be32(Zlib.crc32(body)))
                }
                do {
                    let image = try ImageFile.decode(bad, name: file).image
                    #expect(sizeMayChange || (image.width == reference.width && image.height == reference.height))
                } catch let e as ImageError {
                    #expect(e.file == file)
                }
            }
        }
    }
}

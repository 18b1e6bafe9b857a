// Data files assembled into read-only memory. `.incbin` finds the file through the include
// path: Package.swift gives this target `.headerSearchPath(".")`, so the file next to this one
// is found whatever directory the compiler runs in. (SwiftPM does not track the .gz as a
// dependency: touch this file after replacing it.)
    .section .rodata
    .balign 16
    .global diffuse_clip_bpe_gz_start
    .hidden diffuse_clip_bpe_gz_start
diffuse_clip_bpe_gz_start:
    .incbin "bpe_simple_vocab_16e6.txt.gz"
    .global diffuse_clip_bpe_gz_end
    .hidden diffuse_clip_bpe_gz_end
diffuse_clip_bpe_gz_end:

    // No executable stack.
    .section .note.GNU-stack,"",@progbits

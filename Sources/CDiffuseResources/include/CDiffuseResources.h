#ifndef CDIFFUSE_RESOURCES_H
#define CDIFFUSE_RESOURCES_H

#include <stddef.h>

/// CLIP's BPE vocabulary, `bpe_simple_vocab_16e6.txt.gz` (MIT, see LICENSE.openai_CLIP), linked
/// into the binary so that single-file checkpoints, which carry no tokenizer, work offline.
const unsigned char *diffuse_clip_bpe_gz_data(void);
size_t diffuse_clip_bpe_gz_size(void);

#endif

#include "CDiffuseResources.h"

// Defined in resources.S. Swift cannot import arrays of unknown size, hence the accessors.
extern const unsigned char diffuse_clip_bpe_gz_start[];
extern const unsigned char diffuse_clip_bpe_gz_end[];

const unsigned char *diffuse_clip_bpe_gz_data(void) { return diffuse_clip_bpe_gz_start; }

size_t diffuse_clip_bpe_gz_size(void) { return (size_t)(diffuse_clip_bpe_gz_end - diffuse_clip_bpe_gz_start); }

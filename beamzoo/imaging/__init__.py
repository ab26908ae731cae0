"""Decoding, sniffing, resizing and scaling images: plain functions on bytes and arrays."""
from beamzoo.imaging.decode import (EXTENSIONS, FORMATS, check_png_chunks, decode, known_format, magic_format,
                                   read_header, sniff)
from beamzoo.imaging.heif import decoder_threads
from beamzoo.imaging.jpeg import jpeg_end
from beamzoo.imaging.resize import SHRINK_FILTERS, decode_resized, resize_crop, scaled

__all__ = ["EXTENSIONS", "FORMATS", "SHRINK_FILTERS", "check_png_chunks", "decode", "decode_resized", "decoder_threads",
           "jpeg_end", "known_format", "magic_format", "read_header", "resize_crop", "scaled", "sniff"]

"""Decoding, sniffing, resizing and scaling images: plain functions on bytes and arrays."""
from beamzoo.imaging.decode import FORMATS, check_png_chunks, decode, known_format, magic_format, read_header, sniff
from beamzoo.imaging.jpeg import jpeg_end
from beamzoo.imaging.resize import SHRINK_FILTERS, decode_resized, resize_crop, scaled

__all__ = ["FORMATS", "SHRINK_FILTERS", "check_png_chunks", "decode", "decode_resized", "jpeg_end", "known_format", "magic_format",
           "read_header", "resize_crop", "scaled", "sniff"]

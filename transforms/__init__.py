"""Pipeline stages, one module each: read, decode, embed, write, index."""

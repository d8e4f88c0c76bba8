"""Pipeline stages, one file each, in the order data flows: export -> quantize -> validate."""

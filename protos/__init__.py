"""remex's REAPI / ByteStream / Remote Asset / Bots protobuf sources and generated modules."""

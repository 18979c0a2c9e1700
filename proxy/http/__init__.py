"""HTTP/1.1 as bytes: request-target normalisation, chunk framing, client addresses."""

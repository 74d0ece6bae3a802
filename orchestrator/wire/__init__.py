"""The gRPC boundary: generated protobuf modules (committed, see scripts/gen-proto.sh),
the one table mapping errors to status codes (``status``), and the one place that
converts messages to Python values (``convert``)."""

PROTOCOL_VERSION = 1

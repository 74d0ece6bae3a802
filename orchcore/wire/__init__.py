"""The gRPC boundary: generated protobuf modules (committed, see scripts/gen-proto.sh),
the one table mapping errors to status codes (``status``), the one place that converts
messages to Python values (``convert``), and channels, auth and streams (``channel``)."""

# Bumped on any change an older peer cannot ignore; peers of another version are refused.
PROTOCOL_VERSION = 6

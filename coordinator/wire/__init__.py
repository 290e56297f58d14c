"""The wire: gRPC servicers and the one conversion between domain records and protobuf."""

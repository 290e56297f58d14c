"""Generated code for the polyarch.v1 protobuf package (see proto/generate.py)."""

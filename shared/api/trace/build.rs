fn main() -> Result<(), Box<dyn std::error::Error>> {
    proto_build::compile(&["ordersaga/trace/v1/trace.proto"], "trace_descriptor")
}

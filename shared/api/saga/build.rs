fn main() -> Result<(), Box<dyn std::error::Error>> {
    proto_build::compile(&["ordersaga/saga/v1/saga.proto"], "saga_descriptor")
}

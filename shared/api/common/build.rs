fn main() -> Result<(), Box<dyn std::error::Error>> {
    proto_build::compile(&["ordersaga/common/v1/money.proto"], "common_descriptor")
}

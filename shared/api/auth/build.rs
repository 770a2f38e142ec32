fn main() -> Result<(), Box<dyn std::error::Error>> {
    proto_build::compile(&["ordersaga/auth/v1/auth.proto"], "auth_descriptor")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    proto_build::compile(&["ordersaga/events/v1/envelope.proto"], "events_descriptor")
}

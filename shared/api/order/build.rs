fn main() -> Result<(), Box<dyn std::error::Error>> {
    proto_build::compile(&["ordersaga/order/v1/order.proto"], "order_descriptor")
}

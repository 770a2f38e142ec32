fn main() -> Result<(), Box<dyn std::error::Error>> {
    proto_build::compile(
        &["ordersaga/payment/v1/payment.proto"],
        "payment_descriptor",
    )
}

//! Generates the agent protocol's messages (prost) and its ttrpc service glue.
//!
//! protox compiles the .proto in-process so the build needs no `protoc`.
//! prost-build has no ttrpc backend, so `TtrpcServiceGenerator` below emits,
//! for every service in the file, a server trait, a `Service` adapter and a
//! typed client on top of `crate::ttrpc`. Adding an rpc to the .proto needs
//! no hand edits here.

use std::fmt::Write as _;

const PROTO_DIR: &str = "proto";
const PROTOS: &[&str] = &["proto/agent.proto"];

fn main() {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let fds = match protox::compile(PROTOS, [PROTO_DIR]) {
        Ok(fds) => fds,
        Err(err) => {
            // protox renders the error with file, line and column.
            eprintln!("{err:?}");
            panic!("compiling {PROTOS:?} failed: {err}");
        }
    };
    let mut config = prost_build::Config::new();
    config.service_generator(Box::new(TtrpcServiceGenerator));
    if let Err(err) = config.compile_fds(fds) {
        panic!("generating Rust code for {PROTOS:?} failed: {err}");
    }
}

struct TtrpcServiceGenerator;

/// "FooBar" -> "foo_bar".
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, ch) in name.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i != 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

fn doc_lines(lines: &[String], indent: &str, buf: &mut String) {
    for line in lines {
        // A leading space in proto comments is the separator after "//".
        let line = line.strip_prefix(' ').unwrap_or(line);
        // Indented comment text would become a rustdoc code block, and then
        // a doctest; keep it as plain text.
        let line = line.trim_start();
        let _ = writeln!(buf, "{indent}/// {line}");
    }
}

impl prost_build::ServiceGenerator for TtrpcServiceGenerator {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        for m in &service.methods {
            assert!(
                !m.client_streaming && !m.server_streaming,
                "{}.{}: streaming rpcs are not supported by husk's ttrpc",
                service.proto_name,
                m.proto_name
            );
        }
        let name = &service.name;
        let snake = snake_case(name);
        let full_name = if service.package.is_empty() {
            service.proto_name.clone()
        } else {
            format!("{}.{}", service.package, service.proto_name)
        };
        let const_name = format!("{}_SERVICE_NAME", snake.to_ascii_uppercase());
        let adapter = format!("{name}TtrpcAdapter");
        let client = format!("{name}Client");

        let _ = writeln!(
            buf,
            "/// Full ttrpc name of the `{full_name}` service.\n\
             pub const {const_name}: &str = \"{full_name}\";\n"
        );

        // Server trait.
        doc_lines(&service.comments.leading, "", buf);
        let _ = writeln!(
            buf,
            "/// Server side of `{full_name}`: implement it and serve it with\n\
             /// [`{snake}_service`] and [`crate::ttrpc::Server`].\n\
             #[::async_trait::async_trait]\n\
             pub trait {name}: ::core::marker::Send + ::core::marker::Sync + 'static {{"
        );
        for m in &service.methods {
            doc_lines(&m.comments.leading, "    ", buf);
            let _ = writeln!(
                buf,
                "    async fn {}(&self, req: {}) -> ::core::result::Result<{}, crate::ttrpc::Status>;",
                m.name, m.input_type, m.output_type
            );
        }
        let _ = writeln!(buf, "}}\n");

        // Service adapter.
        let _ = writeln!(
            buf,
            "/// Wraps a [`{name}`] implementation as a ttrpc service.\n\
             pub fn {snake}_service<T: {name}>(inner: ::std::sync::Arc<T>) -> ::std::sync::Arc<dyn crate::ttrpc::Service> {{\n\
             \x20   ::std::sync::Arc::new({adapter} {{ inner }})\n\
             }}\n\n\
             struct {adapter}<T> {{\n\
             \x20   inner: ::std::sync::Arc<T>,\n\
             }}\n\n\
             impl<T: {name}> crate::ttrpc::Service for {adapter}<T> {{\n\
             \x20   fn name(&self) -> &str {{\n\
             \x20       {const_name}\n\
             \x20   }}\n\n\
             \x20   fn call(\n\
             \x20       &self,\n\
             \x20       method: &str,\n\
             \x20       payload: ::bytes::Bytes,\n\
             \x20   ) -> ::futures::future::BoxFuture<'static, ::core::result::Result<::std::vec::Vec<u8>, crate::ttrpc::Status>> {{\n\
             \x20       let inner = ::std::sync::Arc::clone(&self.inner);\n\
             \x20       match method {{"
        );
        for m in &service.methods {
            let _ = writeln!(
                buf,
                "            \"{proto}\" => ::std::boxed::Box::pin(async move {{\n\
                 \x20               let req: {input} = crate::ttrpc::decode_request(\"{proto}\", payload)?;\n\
                 \x20               let resp = inner.{rust}(req).await?;\n\
                 \x20               ::core::result::Result::Ok(::prost::Message::encode_to_vec(&resp))\n\
                 \x20           }}),",
                proto = m.proto_name,
                input = m.input_type,
                rust = m.name,
            );
        }
        let _ = writeln!(
            buf,
            "            _ => {{\n\
             \x20               let status = crate::ttrpc::Status::unimplemented(::std::format!(\n\
             \x20                   \"{full_name}/{{method}} is not implemented\"\n\
             \x20               ));\n\
             \x20               ::std::boxed::Box::pin(async move {{ ::core::result::Result::Err(status) }})\n\
             \x20           }}\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n"
        );

        // Client.
        let _ = writeln!(
            buf,
            "/// Typed client of `{full_name}`. Cloning is cheap; clones share the\n\
             /// connection. A `timeout` of `None` waits for the answer forever.\n\
             #[derive(Clone, Debug)]\n\
             pub struct {client} {{\n\
             \x20   inner: crate::ttrpc::Client,\n\
             }}\n\n\
             impl {client} {{\n\
             \x20   pub fn new(inner: crate::ttrpc::Client) -> Self {{\n\
             \x20       Self {{ inner }}\n\
             \x20   }}\n\n\
             \x20   /// The underlying connection.\n\
             \x20   pub fn inner(&self) -> &crate::ttrpc::Client {{\n\
             \x20       &self.inner\n\
             \x20   }}\n"
        );
        for m in &service.methods {
            doc_lines(&m.comments.leading, "    ", buf);
            let _ = writeln!(
                buf,
                "    pub async fn {rust}(\n\
                 \x20       &self,\n\
                 \x20       req: {input},\n\
                 \x20       timeout: ::core::option::Option<::std::time::Duration>,\n\
                 \x20   ) -> ::core::result::Result<{output}, crate::ttrpc::Error> {{\n\
                 \x20       self.inner.unary({const_name}, \"{proto}\", &req, timeout).await\n\
                 \x20   }}\n",
                rust = m.name,
                input = m.input_type,
                output = m.output_type,
                proto = m.proto_name,
            );
        }
        let _ = writeln!(buf, "}}");
    }
}

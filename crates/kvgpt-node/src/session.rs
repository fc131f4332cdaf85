//! `NativeSession`: one sequence held across calls (its KV cache allocated once), fed through
//! the model's engine, batched with whatever else runs. It holds the model and its engine, so a
//! session made before `dispose` keeps working until it is dropped. The low-level API under
//! incremental use and the step benchmarks.

use crate::error::{to_napi, IntoNapi};
use crate::model::{to_ids, Loaded};
use kvgpt::{Error, Job, Session};
use napi::bindgen_prelude::Object;
use napi::Env;
use napi_derive::napi;
use std::sync::{Arc, Mutex};

#[napi]
pub struct NativeSession {
    loaded: Loaded,
    session: Arc<Mutex<Session>>,
}

impl NativeSession {
    pub(crate) fn new(loaded: Loaded, capacity: usize, use_cache: bool) -> napi::Result<Self> {
        let session = Session::new(loaded.model.gpt2(), capacity, use_cache).napi()?;
        Ok(Self { loaded, session: Arc::new(Mutex::new(session)) })
    }
}

fn poisoned() -> napi::Error {
    to_napi(Error::InvalidInput("the session is poisoned by an earlier failure; start a new one".into()))
}

#[napi]
impl NativeSession {
    /// Appends ids, runs them through the engine and resolves with the most likely next id.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn feed<'env>(&self, env: &'env Env, ids: Vec<f64>) -> napi::Result<Object<'env>> {
        let Loaded { model, engine } = &self.loaded;
        let ids = to_ids(&ids).napi()?;
        model.check_ids(&ids).napi()?;
        let (deferred, promise) = env.create_deferred::<u32, Box<dyn FnOnce(Env) -> napi::Result<u32>>>()?;
        let on_done = Box::new(move |r: kvgpt::Result<u32>| match r {
            Ok(id) => deferred.resolve(Box::new(move |_| Ok(id))),
            Err(e) => deferred.reject(to_napi(e)),
        });
        engine.submit(Job::Feed { session: self.session.clone(), ids, on_done }).napi()?;
        Ok(promise)
    }

    /// Keeps the first `len` tokens; the cache stays allocated.
    #[napi]
    pub fn truncate(&self, len: u32) -> napi::Result<()> {
        self.session.lock().map_err(|_| poisoned())?.truncate(len as usize);
        Ok(())
    }

    #[napi(getter)]
    pub fn length(&self) -> napi::Result<u32> {
        Ok(self.session.lock().map_err(|_| poisoned())?.tokens().len() as u32)
    }

    /// Bytes of this session's KV cache (0 without one).
    #[napi(getter)]
    pub fn cache_bytes(&self) -> napi::Result<f64> {
        Ok(self.session.lock().map_err(|_| poisoned())?.cache().map_or(0, |c| c.bytes()) as f64)
    }
}

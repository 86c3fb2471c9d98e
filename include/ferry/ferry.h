/*
 * ferry/ferry.h - the whole public API of libferry.
 *
 *   common.h     export macro, error object and the 0/-errno convention
 *   channel.h    buffered byte channels with sticky errors
 *   stream.h     wire constants and the checked record layer
 *   vmstate.h    declarative field tables for non-iterable device state
 *   migration.h  context, device registry, hooks, save and load loops
 *   transport.h  tcp:/unix:/fd:/file: URIs
 *   ram.h        guest RAM as an iterable device (precopy)
 *   multifd.h    parallel RAM channels
 *   engine.h     the migration engine: a whole live migration, either side
 */
#ifndef FERRY_FERRY_H
#define FERRY_FERRY_H

#include "ferry/common.h"
#include "ferry/channel.h"
#include "ferry/stream.h"
#include "ferry/vmstate.h"
#include "ferry/migration.h"
#include "ferry/transport.h"
#include "ferry/ram.h"
#include "ferry/multifd.h"
#include "ferry/engine.h"

#endif
